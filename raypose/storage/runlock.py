"""One run or sweep at a time per name: a lock in storage, taken before Ray starts.

Two `raypose train` (or `tune`) of the same --name and --storage would write the same checkpoints
and Ray Train records; the second is refused in one line before it starts Ray. The lock is
<storage>/.raypose-locks/<name>.json (outside the run's own folder, which Ray Tune copies back and
forth): who holds it (host, process, command, start) and a heartbeat its holder refreshes every
HEARTBEAT_S seconds. A lock whose heartbeat is older than RAYPOSE_LOCK_STALE_S seconds (120 by
default), or whose process on this host has ended, is stale: the next run takes it over, saying so.

Taking it: on a local folder the lock file is created exclusively (O_EXCL); on object storage, where
a write cannot be conditional everywhere, it is written, read back after SETTLE_S seconds and kept
only if it is still this process's own (of two runs started together, the later write wins and the
other refuses).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time

from raypose import storage, validate
from raypose.config import ConfigError

LOCKS = ".raypose-locks"
HEARTBEAT_S = 30.0
SETTLE_S = 1.0
STALE_ENV, STALE_DEFAULT = "RAYPOSE_LOCK_STALE_S", 120.0


class RunLockedError(ConfigError):
    """Another run or sweep of the same name holds the lock."""


def lock_location(loc: storage.Location, name: str) -> storage.Location:
    return loc.join(LOCKS, name.replace("/", "_") + ".json")


def _read(lock: storage.Location) -> dict | None:
    try:
        record = json.loads(storage.read_text(lock))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}  # half-written or foreign: stale, taken over
    return record if isinstance(record, dict) else {}


def _process_exists(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def held(record: dict | None) -> bool:
    """Whether a lock record is held by a live run."""
    if not record:
        return False
    age = time.time() - float(record.get("heartbeat") or 0)
    if age > validate.env_seconds(STALE_ENV, STALE_DEFAULT):
        return False
    if record.get("host") == socket.gethostname():
        return _process_exists(record.get("pid"))
    return True


def _describe(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started") or 0)))
    age = time.time() - float(record.get("heartbeat") or 0)
    return (
        f"`{record.get('command', 'raypose')}` as process {record.get('pid')} on "
        f"{record.get('host')} since {since} (alive {age:.0f} s ago)"
    )


def _write(lock: storage.Location, record: dict, exclusive: bool) -> bool:
    text = json.dumps(record, indent=1)
    if lock.scheme == "file" and exclusive:
        os.makedirs(os.path.dirname(lock.path), exist_ok=True)
        try:
            fd = os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    storage.write_text(lock, text)
    return True


@contextlib.contextmanager
def hold(loc: storage.Location, name: str, command: str):
    """Hold the lock of run/sweep `name` under storage loc while the block runs."""
    lock = lock_location(loc, name)
    record = {
        "token": secrets.token_hex(8),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": time.time(),
        "heartbeat": time.time(),
    }
    refused = (
        f"{name!r} under {loc.uri} is already running: {{}}; wait for it to end or stop "
        f"it, or use another --name (its lock: {lock.uri})"
    )
    existing = _read(lock)
    if held(existing):
        raise RunLockedError(refused.format(_describe(existing)))
    if existing is not None:
        print(
            f"[raypose] taking over the stale lock of {name!r} ({lock.uri}"
            + (f": {_describe(existing)}" if existing else "")
            + ")",
            flush=True,
        )
    if not _write(lock, record, exclusive=existing is None):
        raise RunLockedError(refused.format(_describe(_read(lock) or {})))
    if lock.scheme != "file" or existing is not None:
        time.sleep(SETTLE_S)
        now = _read(lock) or {}
        if now.get("token") != record["token"]:
            raise RunLockedError(refused.format(_describe(now)))
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            record["heartbeat"] = time.time()
            with contextlib.suppress(Exception):  # a storage outage: the next beat tries again
                storage.write_text(lock, json.dumps(record, indent=1))

    thread = threading.Thread(target=beat, name="raypose-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            if (_read(lock) or {}).get("token") == record["token"]:
                storage.filesystem(lock).rm_file(lock.path)
