"""Entrypoint for `ray job submit ... -- python jobs/evaluate.py ...`: the same flags as `raypose evaluate`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raypose/

from raypose.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
