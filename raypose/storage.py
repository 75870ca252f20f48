"""Experiment storage: one URI (a plain path, file://..., or s3://bucket/prefix) through fsspec.

S3 goes through s3fs and works with any S3-compatible endpoint (AWS, MinIO, Ceph, moto). The
endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE); they are never taken
from flags, never passed around explicitly and never written to logs, configs or checkpoints.
"""

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec


class StorageError(RuntimeError):
    """Storage is unreachable or a path in it is missing; the message names the URI."""


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" or "s3"
    path: str  # absolute local path, or "bucket/prefix" for s3 (no scheme)

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def join(self, *parts) -> "Location":
        return Location(self.scheme, posixpath.join(self.path, *[str(p).strip("/") for p in parts]))


def parse(uri: str) -> Location:
    if not uri:
        raise StorageError("storage URI is empty; give a path, file:///path or s3://bucket/prefix")
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r} has no bucket; expected s3://bucket/prefix")
        return Location("s3", f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else str(uri)
        return Location("file", str(Path(path).expanduser().resolve()))
    raise StorageError(f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r}; "
                       "use a path, file:// or s3://")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(loc: Location) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a location. s3fs reads credentials from the environment."""
    if loc.scheme == "s3":
        import s3fs

        client_kwargs = {}
        if endpoint_url():
            client_kwargs["endpoint_url"] = endpoint_url()
        # Retries are kept short so that an unreachable endpoint fails in seconds, not minutes.
        return s3fs.S3FileSystem(client_kwargs=client_kwargs,
                                 config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                                                "retries": {"max_attempts": 2}},
                                 skip_instance_cache=True)
    return fsspec.filesystem("file")


def ray_storage(loc: Location):
    """(storage_path, storage_filesystem) for Ray's RunConfig: the same filesystem as fsspec's,
    wrapped for pyarrow; local paths go to Ray as they are."""
    if loc.scheme == "s3":
        import pyarrow.fs

        return loc.path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem(loc)))
    return loc.path, None


def check_reachable(loc: Location, create: bool = True) -> None:
    """Fail early, with one clear message, when storage cannot be used."""
    fs = filesystem(loc)
    if loc.scheme == "file":
        try:
            if create:
                Path(loc.path).mkdir(parents=True, exist_ok=True)
            elif not Path(loc.path).exists():
                raise StorageError(f"storage path {loc.path} does not exist")
        except OSError as e:
            raise StorageError(f"storage path {loc.path} is not writable: {e.strerror}") from None
        return
    bucket = loc.path.split("/", 1)[0]
    where = f" at endpoint {endpoint_url()}" if endpoint_url() else ""
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageError(f"storage {loc.uri}: bucket {bucket!r} does not exist{where}") from None
    except PermissionError:
        raise StorageError(f"storage {loc.uri}: access to bucket {bucket!r} denied{where}; check "
                           "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
    except Exception as e:  # connection refused, DNS, timeouts: botocore raises many kinds
        raise StorageError(f"storage {loc.uri} is unreachable{where}: {type(e).__name__}; check "
                           "AWS_ENDPOINT_URL and the network") from None


def exists(loc: Location) -> bool:
    return filesystem(loc).exists(loc.path)


def read_text(loc: Location) -> str:
    with filesystem(loc).open(loc.path, "r") as f:
        return f.read()


def write_text(loc: Location, text: str, overwrite: bool = True) -> None:
    fs = filesystem(loc)
    if not overwrite and fs.exists(loc.path):
        raise StorageError(f"{loc.uri} already exists; refusing to overwrite it")
    if loc.scheme == "file":
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(loc.path).with_name(Path(loc.path).name + ".tmp")
        tmp.write_text(text)
        tmp.replace(loc.path)  # atomic: a reader never sees half a file
        return
    with fs.open(loc.path, "w") as f:
        f.write(text)


def upload_dir(local_dir: str, loc: Location) -> None:
    """Copy a local directory's files (not recursive into subfolders) to loc."""
    fs = filesystem(loc)
    if loc.scheme == "file":
        Path(loc.path).mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(local_dir).iterdir()):
        if p.is_file():
            fs.put_file(str(p), posixpath.join(loc.path, p.name))


def download_dir(loc: Location, local_dir: str) -> Path:
    """Copy the files of a storage directory into local_dir; returns local_dir."""
    fs = filesystem(loc)
    if not fs.isdir(loc.path):
        raise StorageError(f"{loc.uri} does not exist or is not a directory")
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    for info in fs.ls(loc.path, detail=True):
        if info["type"] == "file":
            fs.get_file(info["name"], str(out / posixpath.basename(info["name"])))
    return out
