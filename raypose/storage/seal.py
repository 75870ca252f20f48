"""The trust boundary of a sweep's storage: Tune's pickles are read back only when this machine's
key sealed them.

Ray Tune keeps a sweep's state partly as pickles (tuner.pkl, the searcher wrapper's
search_gen_state-*.json, a grid sweep's basic-variant-state-*.json, the trials' fields inside
experiment_state-*.json, error.pkl), and
`Tuner.restore` unpickles them: whoever can write to the experiment's storage could run code on
the machine of whoever resumes the sweep. raypose therefore hands Tune a filesystem that

- on every write of such a file, stores beside it `<file>.raypose-seal`: an HMAC-SHA256 of the
  file's name and bytes under a key that never enters the storage, and
- on every read of such a file, checks the bytes it is about to return against that seal and
  raises SealError instead when the seal is missing, made with another key or does not match.

The check runs on the very bytes Tune gets, so a file swapped between a check and its use is
caught too. `verify_experiment` runs the same check over the whole experiment before a resume,
so that a refusal is one line before Ray starts any trial.

The key: RAYPOSE_SEAL_KEY when set (at least 32 characters; give every machine that may resume the
sweep the same value, e.g. from a Kubernetes Secret), otherwise ~/.raypose/seal.key, made on first
use with 32 random bytes and mode 0600. The filesystem object carries no key (Tune pickles it into
tuner.pkl and sends it to its processes); each process reads its own, once.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
from pathlib import Path, PurePosixPath

import pyarrow
import pyarrow.fs

from raypose import storage
from raypose.config import ConfigError
from raypose.storage import retry_outage
from raypose.storage.retry import RetryingHandler, SpooledUpload

KEY_ENV = "RAYPOSE_SEAL_KEY"
MIN_KEY_CHARS = 32
SUFFIX = ".raypose-seal"
# the files of a Tune experiment that Ray unpickles (or that embed pickles) when it reads them
GUARDED = re.compile(
    r"(\.pkl|^experiment_state-.*\.json|^search_gen_state-.*\.json"
    # the grid sweep's BasicVariantGenerator state: cloudpickle despite its name
    r"|^basic-variant-state-.*\.json)$"
)


class SealError(ConfigError):
    """A file Ray would unpickle is not sealed with this machine's key: it is not read."""


def guarded(path: str) -> bool:
    name = PurePosixPath(path).name
    return not name.endswith(SUFFIX) and bool(GUARDED.search(name))


def key_file() -> Path:
    return Path.home() / ".raypose" / "seal.key"


def load_key() -> bytes:
    """This machine's sealing key (see the module's docstring)."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if len(value) < MIN_KEY_CHARS:
            raise ConfigError(
                f"{KEY_ENV} must be at least {MIN_KEY_CHARS} characters "
                f"(got {len(value)}); e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`"
            )
        return value.encode()
    path = key_file()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(
            f"{path} is not a sealing key (64 hex digits); delete it to make a new "
            f"one, or set {KEY_ENV}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    # O_EXCL: two sweeps starting at once keep one key between them
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


_KEY: bytes | None = None


def current_key() -> bytes:
    """This process's key, read once (a sweep's driver reads it before Ray starts)."""
    global _KEY
    if _KEY is None:
        _KEY = load_key()
    return _KEY


def key_id(key: bytes) -> str:
    """A name for a key that reveals nothing usable about it."""
    return hashlib.sha256(b"raypose-seal-key-id\0" + key).hexdigest()[:12]


def seal_text(key: bytes, path: str, data: bytes) -> str:
    mac = hmac.new(key, PurePosixPath(path).name.encode() + b"\0" + data, hashlib.sha256)
    return f"hmac-sha256 {key_id(key)} {mac.hexdigest()}\n"


def check(key: bytes, path: str, data: bytes, seal: bytes | None, where: str) -> None:
    """Raise SealError unless seal is this key's seal of (path's name, data)."""

    def refuse(why: str):
        raise SealError(
            f"refusing to read {where}: {why}. Ray would unpickle it, and raypose "
            "reads such files only when the key of the machine that wrote them "
            f"sealed them (set {KEY_ENV} to that machine's key, or start a new sweep)"
        )

    if seal is None:
        refuse(f"it has no seal ({PurePosixPath(path).name}{SUFFIX} is missing)")
    # one line per version of the file: two while the file is being replaced
    lines = [line.split() for line in seal.decode(errors="replace").splitlines()[:2]]
    if not lines or any(len(p) != 3 or p[0] != "hmac-sha256" for p in lines):
        refuse(f"its seal ({PurePosixPath(path).name}{SUFFIX}) is malformed")
    if all(p[1] != key_id(key) for p in lines):
        refuse(
            f"it was sealed with another key (key id {lines[0][1]}; this machine's is "
            f"{key_id(key)})"
        )
    expected = seal_text(key, path, data).split()[2]
    if not any(hmac.compare_digest(expected, p[2]) for p in lines):
        refuse("its content does not match its seal (it was changed after the sweep wrote it)")


def verify_experiment(fs, root: str, where) -> int:
    """Check every guarded file under root (an fsspec filesystem and path) against its seal
    before a resume; where(path) names a file for the error. Returns how many were checked."""
    key = current_key()
    checked = 0
    for path in sorted(fs.find(root)):
        if guarded(path):
            try:
                seal = fs.cat_file(path + SUFFIX)
            except FileNotFoundError:
                seal = None
            check(key, path, fs.cat_file(path), seal, where(path))
            checked += 1
    return checked


def tune_storage(loc):
    """(storage_path, storage_filesystem) for Tune's RunConfig and Tuner.restore: storage's
    retrying filesystem (local folders included) that seals and checks Tune's pickles."""
    current_key()  # a key that cannot be read or made is refused before Ray starts
    return loc.path, pyarrow.fs.PyFileSystem(SealingHandler(storage.filesystem(loc)))


class _SealedUpload(SpooledUpload):
    """An upload that also writes the file's seal (raypose.storage.seal) once the file is in storage."""

    def __init__(self, fs, path: str):
        super().__init__(fs, path)
        self._data = io.BytesIO()

    def write(self, b):
        self._data.write(b)
        return super().write(b)

    def close(self):
        if self.closed:
            return
        stamp_path = self._path + SUFFIX
        new = seal_text(current_key(), self._path, self._data.getvalue()).encode()
        # the seal holds both the old and the new file's lines while the file is replaced, so a
        # process stopped between the two writes leaves a file its seal still covers
        try:
            old = retry_outage(f"reading {stamp_path}", lambda: self._fs.cat_file(stamp_path))
        except FileNotFoundError:
            old = b""
        if old.strip():
            # the file's current line (the last one: a replacement cut earlier may have left two)
            old = old.strip().splitlines()[-1] + b"\n"
            retry_outage(f"writing {stamp_path}", lambda: self._fs.pipe_file(stamp_path, old + new))
        super().close()
        retry_outage(f"writing {stamp_path}", lambda: self._fs.pipe_file(stamp_path, new))


class SealingHandler(RetryingHandler):
    """The filesystem Ray Tune gets (raypose.storage.seal): every file Tune would unpickle is sealed when
    written and checked against its seal when read. The handler holds no key (it is pickled
    into tuner.pkl and sent to Ray's processes): each process uses its own, current_key."""

    def _open_for_reading(self, path):
        if not guarded(path):
            return super()._open_for_reading(path)

        def read(p):
            with self.fs.open(p, "rb") as f:
                return f.read()

        data = retry_outage(f"reading {path}", lambda: read(path))
        try:
            stamp = retry_outage(f"reading {path}{SUFFIX}", lambda: read(path + SUFFIX))
        except FileNotFoundError:
            stamp = None
        check(current_key(), path, data, stamp, path)
        return pyarrow.BufferReader(data)

    def open_output_stream(self, path, metadata):
        if not guarded(path):
            return super().open_output_stream(path, metadata)
        return pyarrow.PythonFile(_SealedUpload(self.fs, path), mode="w")

    def delete_file(self, path):
        super().delete_file(path)
        if guarded(path):
            try:
                super().delete_file(path + SUFFIX)
            except FileNotFoundError:
                pass

    def move(self, src, dest):
        if guarded(src) or guarded(dest):
            # a guarded file is moved with its seal only when the seal covers its new name
            data = self._open_for_reading(src).read()
            stream = self.open_output_stream(dest, None)
            stream.write(data)
            stream.close()
            self.delete_file(src)
            return None
        return super().move(src, dest)
