"""Entrypoint for `ray job submit ... -- python jobs/tune.py ...`: the same flags as `raypose tune`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raypose/

from raypose.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
