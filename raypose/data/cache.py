"""Data in object storage: a manifest next to the split files, and a node-local cache of them.

`--data` is either a local folder every node sees (a shared volume) or an object-storage URI,
`s3://bucket/prefix`, holding train.h5, test.h5 and manifest.json. For a URI, each node fetches
each file it needs once into a local cache folder and checks it against the manifest:

    ~/.cache/raypose/data/<sha256 of endpoint + URI>/train.h5   (or under $RAYPOSE_DATA_CACHE)

manifest.json (written by `raypose data synth` and `raypose data h36m`, see write_manifest):

    {"manifest_version": 1, "schema_version": 1,
     "files": {"train.h5": {"size": 5013504, "sha256": "...", "schema_version": 1}, ...}}

Several processes on one node (the Ray Train workers of one machine, a driver) share one download:
each file has a lock file next to it (fcntl.flock), the first process downloads to a temporary
name, checks size and sha256 and renames it into place; the others wait on the lock and then find
the file ready. A cached file is trusted by its size against the manifest plus a small sidecar,
<file>.verified.json, recording the sha256 it was last hashed to and the size and mtime it had
then: hashing a few hundred MB on every worker start would cost seconds to minutes per start, while
size and mtime change whenever a file is truncated, rewritten or replaced. The file is hashed
again whenever size, mtime or the manifest's sha256 differ from the sidecar, and a file that does
not match is fetched again. What this does not catch is a change in place that keeps both the size
and the mtime (a disk bit flip); HDF5 reads of such a file still fail or give wrong pixels, as they
would from a shared volume.

The endpoint and credentials are storage.py's (the standard AWS variables); nothing here writes
them anywhere, and the cache folder's name is a hash.
"""

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from raypose import storage

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SPLIT_FILES = ("train.h5", "test.h5")
VERIFIED_SUFFIX = ".verified.json"
LOCK_SUFFIX = ".lock"
READ_BLOCK = 8 * 1024 * 1024  # bytes per read while downloading and hashing


class DataCacheError(RuntimeError):
    """A data URI without a manifest or a file, or a download that does not match the manifest;
    the message names the URI."""


def is_uri(path) -> bool:
    """True for an object-storage URI (s3://...); False for a local path or file://."""
    return urlparse(str(path)).scheme == "s3"


def absolute(data: str) -> str:
    """A local data path made absolute (workers run in other folders); a URI as it is."""
    if is_uri(data):
        return storage.parse(data).uri  # normalised: no trailing slash
    parsed = urlparse(str(data))
    return os.path.abspath(parsed.path if parsed.scheme == "file" else str(data))


def _schema_version(path: Path):
    """The file's schema_version attribute, or None when it has none (validate_file says why)."""
    import h5py

    with h5py.File(path, "r") as f:
        value = f.attrs.get("schema_version")
    return None if value is None else int(value)


def write_manifest(folder) -> Path:
    """Writes folder/manifest.json for the split files present there (train.h5, test.h5):
    size, sha256 and schema version of each. Replaces an older manifest atomically, so a reader
    never sees half of one."""
    from raypose.data.schema import SCHEMA_VERSION

    folder = Path(folder)
    files = {}
    for name in SPLIT_FILES:
        path = folder / name
        if path.is_file():
            files[name] = {
                "size": path.stat().st_size,
                "sha256": storage.sha256_file(path),
                "schema_version": _schema_version(path),
            }
    if not files:
        raise DataCacheError(
            f"{folder}: neither {' nor '.join(SPLIT_FILES)} exists; nothing to write a manifest for"
        )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "files": files,
    }
    target = folder / MANIFEST_FILE
    tmp = folder / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, target)
    return target


def cache_root() -> Path:
    return Path(os.environ.get("RAYPOSE_DATA_CACHE") or "~/.cache/raypose/data").expanduser()


def cache_dir(uri: str) -> Path:
    """This node's cache folder for a data URI: the same bucket/prefix on two endpoints (AWS and a
    local MinIO) never share one."""
    key = f"{storage.endpoint_url() or 'default'}|{storage.parse(uri).uri}"
    return cache_root() / hashlib.sha256(key.encode()).hexdigest()


def read_manifest(loc: storage.Location) -> dict:
    """The manifest at loc (a data URI's folder), checked for the keys this module needs."""
    where = loc.join(MANIFEST_FILE)
    try:
        text = storage.filesystem(loc).cat_file(where.path)
    except FileNotFoundError:
        raise DataCacheError(
            f"--data {loc.uri}: no {MANIFEST_FILE} at {where.uri}; `raypose data "
            "synth` and `raypose data h36m` write it next to train.h5 and test.h5 "
            "(upload it with them)"
        ) from None
    except PermissionError:
        raise DataCacheError(
            f"--data {loc.uri}: access to {where.uri} denied; check the "
            "storage credentials (AWS_ACCESS_KEY_ID or AWS_PROFILE)"
        ) from None
    except Exception as e:  # connection refused, DNS, timeouts: botocore raises many kinds
        raise DataCacheError(
            f"--data {loc.uri}: cannot read {where.uri} ({type(e).__name__}); "
            "check AWS_ENDPOINT_URL and the network"
        ) from None
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        for entry in files.values():
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataCacheError(
            f"--data {loc.uri}: {where.uri} is not a raypose data manifest "
            "(expected JSON with 'files': {name: {size, sha256}})"
        ) from None
    return manifest


def local_data_dir(data: str, files=SPLIT_FILES) -> Path:
    """The local folder holding `files` of --data: a local path as it is; for a URI, this node's
    cache folder, after fetching (once) whatever of `files` is not already there and verified.

    Raises DataCacheError naming the URI when the manifest or a file is missing, or when a
    download does not match the manifest."""
    if not is_uri(data):
        parsed = urlparse(str(data))
        return Path(parsed.path if parsed.scheme == "file" else str(data))
    loc = storage.parse(data)
    manifest = read_manifest(loc)
    folder = cache_dir(loc.uri)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        entry = manifest["files"].get(name)
        if entry is None:
            raise DataCacheError(
                f"--data {loc.uri}: {MANIFEST_FILE} lists no {name} (it lists "
                f"{', '.join(sorted(manifest['files'])) or 'nothing'})"
            )
        fetch_file(loc.join(name), folder / name, entry)
    return folder


def fetch_file(remote: storage.Location, target: Path, entry: dict) -> str:
    """Makes target a verified copy of remote: 'cached' when it already was, 'fetched' when it was
    downloaded now. Processes on one node take turns on target's lock file, so only the first
    downloads."""
    with open(target.with_name(target.name + LOCK_SUFFIX), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if this raises
        if _cached_copy_matches(target, entry):
            return "cached"
        _download(remote, target, entry)
        return "fetched"


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + VERIFIED_SUFFIX)


def _cached_copy_matches(target: Path, entry: dict) -> bool:
    """Size always; sha256 only when the sidecar does not vouch for this size, mtime and hash."""
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != int(entry["size"]):
        return False
    try:
        seen = json.loads(_sidecar(target).read_text())
    except (OSError, ValueError):
        seen = {}
    if seen == {"sha256": entry["sha256"], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
        return True
    if storage.sha256_file(target) != entry["sha256"]:
        return False
    _write_sidecar(target, entry["sha256"])
    return True


def _write_sidecar(target: Path, sha256: str) -> None:
    stat = target.stat()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.verified.tmp")
    tmp.write_text(
        json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    )
    os.replace(tmp, _sidecar(target))


def _download(remote: storage.Location, target: Path, entry: dict) -> None:
    """Streams remote to a temporary name, hashing as it goes, and renames it onto target only
    when size and sha256 match the manifest."""
    _sidecar(target).unlink(missing_ok=True)  # the old copy is no longer vouched for
    for stale in target.parent.glob(f".{target.name}.*.part"):  # left by a process that died
        stale.unlink(missing_ok=True)  # while holding the lock (only the lock holder downloads)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    size = 0
    start = time.perf_counter()
    try:
        with (
            storage.filesystem(remote).open(remote.path, "rb", block_size=READ_BLOCK) as src,
            open(tmp, "wb") as dst,
        ):
            while block := src.read(READ_BLOCK):
                digest.update(block)
                dst.write(block)
                size += len(block)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise DataCacheError(
            f"--data: {remote.uri} is listed in {MANIFEST_FILE} but does not exist"
        ) from None
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataCacheError(
            f"--data: downloading {remote.uri} failed ({type(e).__name__}); "
            "check AWS_ENDPOINT_URL and the network"
        ) from None
    if size != int(entry["size"]) or digest.hexdigest() != entry["sha256"]:
        tmp.unlink(missing_ok=True)
        what = (
            f"{size} bytes, the manifest says {entry['size']}"
            if size != int(entry["size"])
            else "its sha256 differs from the manifest's"
        )
        raise DataCacheError(
            f"--data: {remote.uri} does not match {MANIFEST_FILE} ({what}); "
            "upload the files and the manifest together again"
        )
    os.replace(tmp, target)
    _write_sidecar(target, entry["sha256"])
    seconds = time.perf_counter() - start
    print(
        f"[raypose] data: fetched {remote.uri} ({size / 1e6:.1f} MB in {seconds:.1f} s) into "
        f"{target}",
        flush=True,
    )
