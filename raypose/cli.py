"""The `raypose` command line: one subcommand per job, each wired to the module that does the work.

Each module exposes `add_arguments(parser)` and `run(args)`; imports are lazy so that
`raypose --help` and the light subcommands start fast and never import Ray.

The error contract: bad input gives one line on stderr, `raypose <command>: error: ...`, naming
the flag, key or file, and exit code 2 (argparse's own usage errors too).  Any other failure gives
one line and exit code 1.  RAYPOSE_DEBUG=1 adds the traceback.
"""

import argparse
import importlib
import os
import re
import signal
import sys
import traceback

# (command path, module, help)
COMMANDS = [
    (("data", "synth"), "raypose.data.synth", "render the synthetic dataset (train.h5, test.h5)"),
    (("data", "h36m"), "raypose.data.h36m", "convert a processed Human3.6M tree to raypose HDF5"),
    (
        ("data", "samples"),
        "raypose.data.synth",
        "write a grid of sample crops from an HDF5 file as PNG",
    ),
    (
        ("model-summary",),
        "raypose.model.summary",
        "print each layer's output shape and the parameter count",
    ),
    (("train",), "raypose.train.run", "train on Ray Train (data-parallel workers, CPU or GPU)"),
    (("tune",), "raypose.search.sweep", "search hyperparameters with Ray Tune + Optuna"),
    (
        ("evaluate",),
        "raypose.evaluation.evaluate",
        "evaluate the best (or a named) checkpoint on the test split",
    ),
    (
        ("report",),
        "raypose.evaluation.report",
        "report what a sweep found: learning curves, joint vs pretrain, best settings",
    ),
    (
        ("predict",),
        "raypose.evaluation.predict",
        "run a trained model (or an exported .onnx) on person crops: 3D joints and figures",
    ),
    (
        ("export",),
        "raypose.evaluation.export",
        "export the regression network as ONNX or TorchScript, usable without raypose",
    ),
    (
        ("bench", "train"),
        "raypose.train.bench",
        "measure samples/s: host feed, device augmentation, plain PyTorch loop, Ray Train loop",
    ),
    (
        ("bench", "sweep"),
        "raypose.train.bench_sweep",
        "measure a packed sweep: k trials at once on one device, resident data against the feed",
    ),
    (
        ("cluster",),
        "raypose.cluster.dev",
        "start, stop or describe the local dev cluster (Ray head + S3 server)",
    ),
    (("demo",), "raypose.demo", "the whole chain on this machine: data, sweep, evaluation"),
]

# commands that start or reach Ray: their Ray output goes to a log file unless --verbose
VERBOSE_COMMANDS = {("train",), ("tune",), ("demo",), ("bench", "train")}


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on errors: one line naming the flag, exit code 2.
    Subparsers inherit the class (argparse makes them with type(parent))."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text) -> str:
    """A message on one line: parsers and libraries sometimes put newlines in theirs."""
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


class _Lazy:
    """Imports a command's module only when its parser or its run is needed."""

    def __init__(self, module, entry):
        self.module, self.entry = module, entry

    def __call__(self, *args):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.entry)(*args)


def build_parser(argv=()) -> argparse.ArgumentParser:
    """All commands are listed; only the one named in argv loads its module for its flags."""
    parser = OneLineParser(prog="raypose", description=__doc__.splitlines()[0])
    from raypose import __version__

    parser.add_argument("--version", action="version", version=f"raypose {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for path, module, help_text in COMMANDS:
        subparsers = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            subparsers = groups[path[0]]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        suffix = "_" + path[-1] if path == ("data", "samples") else ""
        if list(argv[: len(path)]) == list(path):
            _Lazy(module, "add_arguments" + suffix)(sub)
        if path in VERBOSE_COMMANDS:
            sub.add_argument(
                "--verbose",
                action="store_true",
                help="also show Ray's and Tune's own log lines (always in the log file "
                "whose path is printed)",
            )
        sub.set_defaults(_run=_Lazy(module, "run" + suffix))
    return parser


def _is_input_error(e: BaseException) -> bool:
    # raypose's own errors (DataError, ConfigError, StorageError, InputError, ...) say what was
    # wrong and where; anything else is a failure of the run or a bug
    return isinstance(e, (ValueError, RuntimeError, OSError)) and type(e).__module__.startswith(
        "raypose."
    )


def main(argv=None) -> int:
    entry = argv is None  # the `raypose` command itself, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if not hasattr(args, "_run"):
        parser.error("no command given; `raypose --help` lists them")
    command = "raypose " + " ".join(
        c for c in (args.command, getattr(args, "subcommand", None)) if c
    )
    if unknown:  # argparse would blame `raypose`; name the command the flag was given to
        parser.exit(2, f"{command}: error: unrecognized arguments: {' '.join(unknown)}\n")
    debug = os.environ.get("RAYPOSE_DEBUG") == "1"
    if getattr(args, "verbose", False):
        os.environ["RAYPOSE_VERBOSE"] = "1"  # read by raypose.console, also in nested calls
    # SIGTERM (`ray job stop`, Kubernetes, `kill`) stops a command as Ctrl-C does: Ray is shut down
    # and the exit code is 130, instead of an end that leaves the local Ray instance running
    from raypose.console import note_interrupt

    signal.signal(signal.SIGTERM, note_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, note_interrupt)  # Ctrl-C: remembered as well as raised
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        from raypose.cluster.driver import shutdown_ray

        stopped = shutdown_ray()
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        # Everything raypose owns is settled by now (storage tidied, the run's lock released, the
        # resume line printed). The interpreter's own exit can still wait without end: it joins the
        # thread pools that Ray Train and Tune left mid-call to a Ray that is gone (a CI run saw it
        # still running 60 s after its last line). A process started as the command ends here.
        if not stopped or entry:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        if _is_input_error(e):
            print(f"{command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        hint = "" if debug else " (RAYPOSE_DEBUG=1 shows the traceback)"
        print(f"{command}: failed: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
