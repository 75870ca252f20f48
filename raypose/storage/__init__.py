"""Experiment storage: one URI (a plain path, file://..., or s3://bucket/prefix) through fsspec.

S3 goes through s3fs and works with any S3-compatible endpoint (AWS, MinIO, Ceph, moto). The
endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE); they are never taken
from flags, never passed around explicitly and never written to logs, configs or checkpoints.

Every wait on an endpoint is bounded (seconds, from the environment; docs/errors-and-environment.md lists them):
RAYPOSE_S3_CONNECT_TIMEOUT (5) to open a connection, RAYPOSE_S3_READ_TIMEOUT (60) for an answer
to arrive, RAYPOSE_S3_ATTEMPTS (2) tries per request, and RAYPOSE_S3_CHECK_TIMEOUT (10) for the
one-try reachability check every command makes before it starts, so that an endpoint that
accepts connections but never answers fails in seconds, with one line.
"""

import contextlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import fsspec

from raypose import validate


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


# how much of a refused URI an error message quotes: whole for any realistic path
URI_SHOWN = 240


def parse(uri: str) -> Location:
    """A Location from a plain path (relative to the current folder, ~ expanded), a file URI
    (RFC 8089: file:///ABS/PATH or file://localhost/ABS/PATH, %-escapes decoded) or
    s3://bucket/prefix.  A '..' segment is refused in a URI (an object key or a file URI must say
    where it is); a plain path is made absolute, '..' resolved."""
    from raypose.validate import shown

    if not uri:
        raise StorageError("storage URI is empty; give a path, file:///path or s3://bucket/prefix")
    text = str(uri)
    named = shown(text, URI_SHOWN)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {named} has no bucket; expected s3://bucket/prefix")
        _refuse_query(text, named)
        path = f"{parsed.netloc}{parsed.path}".rstrip("/")
        _refuse_parent_segment(path, named)
        return Location("s3", path)
    if parsed.scheme == "file":
        return Location("file", _file_uri_path(parsed, text, named))
    if parsed.scheme == "":
        # a plain path is the user's own folder, made absolute here ('..' included)
        return Location("file", str(Path(text).expanduser().resolve()))
    raise StorageError(
        f"storage URI {named}: unsupported scheme {shown(parsed.scheme)}; "
        "use a path, file:// or s3://"
    )


def _refuse_parent_segment(path: str, named: str) -> None:
    if ".." in path.split("/"):
        raise StorageError(
            f"storage URI {named} has a '..' path segment; write the path without "
            "'..' (for a local folder, its absolute path)"
        )


def _refuse_query(text: str, named: str) -> None:
    # urlparse would cut the path at '?' or '#' and drop the rest without a word
    if "?" in text or "#" in text:
        raise StorageError(
            f"storage URI {named} holds '?' or '#', which would end its path there; "
            "storage paths cannot contain them"
        )


def _file_uri_path(parsed, text: str, named: str) -> str:
    """The local absolute path of a file URI, by RFC 8089: the host is empty or localhost."""
    from raypose.validate import shown

    if parsed.netloc.lower() not in ("", "localhost"):
        raise StorageError(
            f"storage URI {named} names the host {shown(parsed.netloc)}, not a "
            "local folder; write file:///ABSOLUTE/PATH (three slashes) or a "
            "plain path"
        )
    if "?" in text or "#" in text:
        raise StorageError(
            f"storage URI {named} holds '?' or '#', which would end its path "
            "there; write them as %3F and %23"
        )
    # file names are bytes on POSIX: decode %-escapes as the file system would name them
    path = os.fsdecode(unquote_to_bytes(parsed.path))
    if not path.startswith("/"):
        raise StorageError(
            f"storage URI {named} has no absolute path; write "
            "file:///ABSOLUTE/PATH (three slashes) or a plain path"
        )
    if "\x00" in path:
        raise StorageError(f"storage URI {named} holds a NUL character (%00)")
    _refuse_parent_segment(path, named)
    # POSIX may give '//' at the start a meaning of its own; file:////x means /x
    return str(Path("/" + path.lstrip("/")).resolve())


def sha256_file(path, block: int = 8 << 20) -> str:
    """The SHA-256 of a local file: the one hasher of data files and checkpoints."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL), checked:
    a malformed one (no http(s)://, a port past 65535) is refused in one line naming the variable,
    before any connection is tried."""
    from raypose.validate import endpoint_url as checked

    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return checked(os.environ[var], f"environment variable {var}")
    return None


def endpoint_text() -> str:
    """The endpoint for messages, without any user:password@ part."""
    url = endpoint_url()
    if not url:
        return "the default AWS endpoint"
    parsed = urlparse(url)
    host = parsed.hostname or url
    return f"{parsed.scheme}://{host}" + (f":{parsed.port}" if parsed.port else "")


def timeouts() -> dict:
    """{'connect', 'read', 'check', 'outage'} seconds and 'attempts', from the environment;
    every S3 filesystem reads them, so a bad value is refused by the first storage check."""
    from raypose.validate import env_count, env_seconds

    return {
        "connect": env_seconds("RAYPOSE_S3_CONNECT_TIMEOUT", 5.0),
        "read": env_seconds("RAYPOSE_S3_READ_TIMEOUT", 60.0),
        "check": env_seconds("RAYPOSE_S3_CHECK_TIMEOUT", 10.0),
        "outage": env_seconds(RETRY_ENV, RETRY_DEFAULT_S),
        "attempts": env_count("RAYPOSE_S3_ATTEMPTS", 2),
    }


def filesystem(loc: Location, check: bool = False) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a location. s3fs reads credentials from the environment.
    check=True: one try, bounded by RAYPOSE_S3_CHECK_TIMEOUT, for check_reachable."""
    if loc.scheme == "s3":
        import s3fs

        client_kwargs = {}
        if endpoint_url():
            client_kwargs["endpoint_url"] = endpoint_url()
        t = timeouts()
        connect, read, attempts = t["connect"], t["read"], t["attempts"]
        if check:
            connect, read, attempts = min(connect, t["check"]), t["check"], 1
        # "standard" mode counts the first try in total_max_attempts (legacy mode did not)
        retries = {"total_max_attempts": attempts, "mode": "standard"}
        fs = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs={"connect_timeout": connect, "read_timeout": read, "retries": retries},
            skip_instance_cache=True,
        )
        # s3fs retries timeouts itself too (5 times, with back-off) on top of botocore's attempts
        fs.retries = attempts
        return fs
    return fsspec.filesystem("file")


RETRY_ENV = "RAYPOSE_UPLOAD_RETRY_S"  # how long Ray's storage operations retry an outage
RETRY_DEFAULT_S = 300.0
# errors that say what is there, not that the store is away: never retried
_DEFINITE = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _transient_errors() -> tuple:
    """What a lost connection to the object store raises through s3fs: OSError, botocore's
    connection and timeout errors, aiohttp's client errors."""
    errors = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


def retry_outage(what: str, step, deadline: float | None = None):
    """step() until it succeeds; an object-store outage (a restart, a dropped link) is retried
    with growing pauses (1, 2, 4 ... 15 s) until RAYPOSE_UPLOAD_RETRY_S seconds (300 by default)
    have passed, each retry announced in one line; then the last error is raised."""
    import time

    if deadline is None:
        deadline = time.monotonic() + timeouts()["outage"]
    transient = _transient_errors()
    pause = 1.0
    while True:
        try:
            return step()
        except _DEFINITE:
            raise
        except transient as e:
            if time.monotonic() + pause > deadline:
                raise
            print(
                f"[raypose] storage: {what} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); retrying in {pause:.0f} s",
                flush=True,
            )
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


# AWS credentials that Ray Tune copies from the driver's environment into every trial's
# runtime_env (ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE), which Ray's runtime-env
# agent writes to its log file
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


@contextlib.contextmanager
def credentials_out_of_environment():
    """While in this context, the AWS credentials of this process's environment are in a
    private shared-credentials file (mode 0600, AWS_SHARED_CREDENTIALS_FILE, the profile that
    AWS_PROFILE names or `default`) instead of its environment: botocore (s3fs) here still finds
    them, and Ray Tune, which copies those variables into each trial's logged runtime_env, finds
    none. Trials get their credentials as the cluster's processes do: from the node's own
    environment (a local instance's processes inherited the driver's when it started them), a
    credentials file, a profile or an instance role. No-op without credentials in the
    environment."""
    import shutil
    import tempfile

    found = {k: os.environ[k] for k in CREDENTIAL_VARIABLES if k in os.environ}
    if not found:
        yield
        return
    folder = tempfile.mkdtemp(prefix="raypose-credentials-")  # 0700
    path = os.path.join(folder, "credentials")
    profile = os.environ.get("AWS_PROFILE") or "default"
    lines = [f"[{profile}]"] + [
        f"{k.lower()} = {v}" for k, v in found.items() if k != "AWS_SECURITY_TOKEN"
    ]
    if "AWS_SESSION_TOKEN" not in found and "AWS_SECURITY_TOKEN" in found:
        lines.append(f"aws_session_token = {found['AWS_SECURITY_TOKEN']}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    previous = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    for k in found:
        del os.environ[k]
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
    try:
        yield
    finally:
        os.environ.update(found)
        if previous is None:
            os.environ.pop("AWS_SHARED_CREDENTIALS_FILE", None)
        else:
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def check_reachable(loc: Location, create: bool = True) -> None:
    """Fail early, with one clear message, when storage cannot be used."""
    if loc.scheme == "file":
        p = Path(loc.path)
        try:
            if p.exists() and not p.is_dir():
                raise StorageError(f"storage path {loc.path} is a file, expected a folder")
            if create:
                p.mkdir(parents=True, exist_ok=True)
            elif not p.exists():
                raise StorageError(f"storage path {loc.path} does not exist")
        except OSError as e:
            raise StorageError(f"storage path {loc.path} is not writable: {e.strerror}") from None
        return
    fs = filesystem(loc, check=True)
    bucket = loc.path.split("/", 1)[0]
    where = f" at endpoint {endpoint_text()}"
    t = timeouts()
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageError(f"storage {loc.uri}: bucket {bucket!r} does not exist{where}") from None
    except PermissionError:
        raise StorageError(
            f"storage {loc.uri}: access to bucket {bucket!r} denied{where}; check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except Exception as e:  # connection refused, DNS, timeouts: botocore raises many kinds
        kind = type(e).__name__
        if "ReadTimeout" in kind or "Timeout" in kind and "Connect" not in kind:
            what = (
                f"accepted the connection but did not answer within {t['check']:g} s "
                "(RAYPOSE_S3_CHECK_TIMEOUT)"
            )
        elif "ConnectTimeout" in kind:
            what = (
                f"did not accept a connection within {min(t['connect'], t['check']):g} s "
                "(RAYPOSE_S3_CONNECT_TIMEOUT)"
            )
        else:
            what = f"is unreachable ({kind})"
        raise StorageError(
            f"storage {loc.uri}: the endpoint {endpoint_text()} {what}; check "
            "AWS_ENDPOINT_URL and the network"
        ) from None


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


# ----------------------------------------------------------------------------------------------
# The --data and --storage flags


def data_location(path, where: str):
    """--data: an object-storage URI (checked for its form here; raypose.data.cache reads its
    manifest before any work) or an existing local folder."""
    text = str(path)
    if "://" in text:
        try:
            loc = parse(text)
        except (ValueError, RuntimeError) as e:
            raise validate.InputError(f"{where} {text}: {e}") from None
        if loc.scheme != "s3" or not loc.path.strip("/"):
            raise validate.InputError(
                f"{where} {text}: expected a local folder or s3://bucket/prefix"
            )
        return text
    return validate.existing_dir(path, where, "data folder")


def storage_location(uri, where: str):
    """The storage Location of a --storage value; a local one must be a folder or absent."""
    try:
        loc = parse(uri)
    except StorageError as e:
        raise validate.InputError(f"{where}: {e}") from None
    if loc.scheme == "file":
        validate.output_dir(loc.path, where)
    return loc
