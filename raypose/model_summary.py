"""`raypose model-summary`: layer output shapes and parameter counts of the network."""

from raypose.config import apply_overrides
from raypose.model import ModelConfig, summary


def add_arguments(parser):
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model setting, e.g. --set fc1_width=512")


def run(args):
    cfg = apply_overrides(ModelConfig(), args.overrides, source="--set")
    print(summary(cfg))
    return 0
