"""`raypose model-summary`: layer output shapes and parameter counts of the network."""

from raypose.config import Config, ConfigError, apply_overrides
from raypose.model.network import summary


def add_arguments(parser):
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set fc1_width=512",
    )


def run(args):
    # the overrides go through the whole config's checks (a zero width or NaN alpha is refused
    # with the --set that gave it), but only model settings change a summary
    cfg, sources = Config(), {}
    apply_overrides(cfg, args.overrides, sources=sources)
    for key, source in sources.items():
        if not key.startswith("model."):
            raise ConfigError(
                f"{source}: {key} is not a model setting; model-summary takes "
                "model.* keys only (lrn_alpha, lrn_beta, lrn_window, dropout, "
                "fc1_width, fc2_width)"
            )
    cfg.validate(sources)
    print(summary(cfg.model))
    return 0
