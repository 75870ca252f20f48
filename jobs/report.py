"""Entrypoint for `ray job submit ... -- python jobs/report.py ...`: the same flags as `raypose report`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds raypose/

from raypose.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
