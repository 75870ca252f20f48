"""The checks every entry point runs before it touches Ray or writes anything.

Each check raises InputError (or the module's own error) with one line that names the flag, key
or file the user gave and says what was expected; `raypose.cli.main` prints that line and exits 2.
Plain Python: no Ray, and nothing here writes to the file system except `replace_atomically`'s
temporary sibling, which is renamed into place or removed.

- Names (run and sweep names) become path components in storage, so they are limited to
  NAME_PATTERN: a letter or digit, then up to 99 letters, digits, '.', '_' or '-', and never '..'.
- Paths are checked for the kind the command needs: an existing file, an existing folder, or an
  output that is absent (or replaced only with --force).
- Ray addresses (--address, RAY_ADDRESS) must be a GCS address HOST:PORT, ray://HOST:PORT,
  `auto` or `local`; something must answer a TCP connect on HOST:PORT within
  RAYPOSE_RAY_CONNECT_TIMEOUT seconds (default 5) before ray.init is called.
- S3 endpoints (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL) must be http(s)://HOST[:PORT] with a port
  in 1..65535; raypose.storage checks the one in use before any connection.
- YAML (config files, search spaces, --set values) is refused past YAML_MAX_ALIASES alias uses
  or YAML_MAX_NODES values with aliases expanded, before anything walks what was loaded.
- A value quoted in an error message goes through `shown` (or `clipped`): at most its first 80
  characters, so a message stays one short line whatever was typed.
"""

import math
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = (
    "a letter or digit, then up to 99 letters, digits, '.', '_' or '-' (ASCII), without '..'"
)

# timeouts (seconds) and their environment variables; docs/errors-and-environment.md lists them
RAY_CONNECT_TIMEOUT = ("RAYPOSE_RAY_CONNECT_TIMEOUT", 5.0)


class InputError(ValueError):
    """Bad input to a command: the message names the flag, key or file."""


# ----------------------------------------------------------------------------------------------
# values quoted in error messages

SHOWN_LIMIT = 80


def clipped(text, limit: int = SHOWN_LIMIT) -> str:
    """text as it is when it has at most `limit` characters, else its first `limit` characters
    and "... (N characters)": an error message stays one readable line whatever was typed."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def shown(value, limit: int = SHOWN_LIMIT) -> str:
    """repr(value) for an error message, cut like `clipped` (N counts the whole repr)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's limit on digits converted to text
        return f"<{type(value).__name__} too large to show>"
    return clipped(text, limit)


# ----------------------------------------------------------------------------------------------
# names and numbers


def check_name(name, where: str) -> str:
    """A run or sweep name that is safe as one path component in any storage."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InputError(f"{where} {shown(name)} is not a valid name: use {NAME_RULE}")
    return name


def env_seconds(var: str, default: float) -> float:
    """A timeout from the environment; a value that is not a positive finite number is refused."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InputError(
            f"environment variable {var}={shown(raw)} must be a positive number of seconds"
        )
    return value


def env_count(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return int(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"environment variable {var}={shown(raw)} must be a whole number >= 1")
    return value


def positive(value, where: str):
    if value is not None and value < 1:
        raise InputError(f"{where} must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# paths


def existing_file(path, where: str, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{where} {path}: no such {what}")
    if p.is_dir():
        raise InputError(f"{where} {path}: is a folder; expected the {what}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{where} {path}: the {what} is not readable (permissions)")
    return p


def existing_dir(path, where: str, what: str = "folder") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{where} {path}: no such {what}")
    if not p.is_dir():
        raise InputError(f"{where} {path}: is a file, expected a {what}")
    return p


def output_dir(path, where: str) -> Path:
    """A folder to write into: absent (it will be made) or a folder; nothing on the way may be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(
            f"{where} {path}: is a file, expected a folder (or a path that does not exist)"
        )
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{where} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                if not p.exists():
                    raise InputError(f"{where} {path}: cannot create it, {parent} is not writable")
            break
    if p.is_dir() and not os.access(p, os.W_OK):
        raise InputError(f"{where} {path}: the folder is not writable")
    return p


def refuse_existing(paths, where: str, force: bool) -> None:
    """Outputs that exist are refused unless --force; a folder is never taken for a file."""
    for p in map(Path, paths):
        if p.is_dir():
            raise InputError(f"{where}: {p} is a folder, expected a file (or nothing) there")
        if p.exists() and not force:
            raise InputError(
                f"{where}: {p} already exists; pass --force to replace it (nothing was written)"
            )


def output_file(path, where: str, force: bool, suffixes=()) -> Path:
    """A file to write: its folder can be made, it is not a folder, and it exists only with --force."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{where} {path}: is a folder; expected the file to write")
    if suffixes and p.suffix.lower() not in suffixes:
        raise InputError(f"{where} {path}: expected a file name ending in {' or '.join(suffixes)}")
    output_dir(p.parent if str(p.parent) else ".", where)
    refuse_existing([p], where, force)
    return p


@contextmanager
def replace_atomically(target):
    """Yields a temporary path next to target; on success it is renamed onto target (atomic on one
    file system), on failure removed, so a reader never sees half a file and a failed write keeps
    the old one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def endpoint_url(url: str, where: str) -> str:
    """An S3 endpoint URL (AWS_ENDPOINT_URL and the like): http(s)://HOST[:PORT][/PATH] with a
    port in 1 to 65535; returns it unchanged, or raises one line naming `where`. The message
    quotes the part at fault, never the whole URL (it may carry a user:password@)."""
    expected = "expected http://HOST[:PORT] or https://HOST[:PORT]"
    text = str(url).strip()
    try:
        parsed = urlparse(text)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        raise InputError(f"{where}: not a URL; {expected}") from None
    if "://" not in text:
        raise InputError(f"{where}: not an S3 endpoint URL (no http:// or https://); {expected}")
    if parsed.scheme.lower() not in ("http", "https"):
        raise InputError(
            f"{where}: not an S3 endpoint URL (the scheme {shown(parsed.scheme)}); {expected}"
        )
    try:
        port = parsed.port
    except ValueError:  # not a number, or past 65535
        raw = parsed.netloc.rpartition("@")[2].rpartition(":")[2]
        raise InputError(
            f"{where}: port {clipped(raw) if raw.isdigit() else shown(raw)} is not a TCP port "
            f"(1 to 65535); {expected}"
        ) from None
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"{where}: port {port} is not a TCP port (1 to 65535); {expected}")
    if not parsed.hostname:
        raise InputError(f"{where}: the URL names no host; {expected}")
    return url


# ----------------------------------------------------------------------------------------------
# Ray addresses


def ray_address(address, where: str):
    """Checks a Ray address before ray.init: returns it unchanged, or raises one line.

    ray.init takes a GCS address (HOST:PORT, 6379 by default on a head node), a Ray Client address
    (ray://HOST:PORT, 10001 by default), `auto` or `local`.  An http:// URL is the dashboard's and
    job server's address: `ray job submit` wants it, ray.init does not."""
    if address is None or address in ("auto", "local"):
        return address
    text = str(address).strip()
    parsed = urlparse(text if "://" in text else f"gcs://{text}")
    if parsed.scheme in ("http", "https"):
        raise InputError(
            f"{where} {text}: an http:// URL is a dashboard / job-server address, "
            "which ray.init does not take; give the GCS address HOST:6379 or "
            "ray://HOST:10001 (for `ray job submit` set RAY_API_SERVER_ADDRESS instead)"
        )
    if parsed.scheme not in ("gcs", "ray"):
        raise InputError(
            f"{where} {text}: unsupported scheme {shown(parsed.scheme)}; expected "
            "HOST:PORT, ray://HOST:PORT, auto or local"
        )
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or port is None or parsed.path not in ("", "/"):
        raise InputError(f"{where} {text}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    var, default = RAY_CONNECT_TIMEOUT
    timeout = env_seconds(var, default)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            answer = _grpc_greeting(sock)
    except TimeoutError:
        raise InputError(
            f"{where} {text}: {host}:{port} did not answer within {timeout:g} s "
            f"({var}); is this the Ray head's GCS port (6379) or Ray Client "
            "port (10001)?"
        ) from None
    except OSError as e:
        raise InputError(
            f"{where} {text}: cannot reach {host}:{port} ({e.strerror or type(e).__name__}, "
            f"waited up to {timeout:g} s, {var}); is the Ray cluster up?"
        ) from None
    if answer is not None:
        raise InputError(
            f"{where} {text}: {host}:{port} {answer}; is this the Ray head's GCS "
            "port (6379) or Ray Client port (10001)?"
        )
    return address


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the GCS and the Ray Client
# server are both gRPC) answers with its own SETTINGS frame (type 0x4).  Without this, a port that
# accepts connections but is not Ray makes ray.init wait for minutes.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _grpc_greeting(sock) -> str | None:
    """None when the peer speaks gRPC (HTTP/2); else what it did.  Raises socket.timeout when it
    says nothing within the socket's timeout.  Skipped when Ray runs with TLS (RAY_USE_TLS)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    sock.sendall(_HTTP2_PREFACE)
    head = sock.recv(9)
    if not head:
        return "closed the connection without answering"
    if len(head) < 4 or head[3] != 0x4:
        return "answered, but not as a gRPC server"
    return None


def ray_address_from(flag_value, flag: str = "--address"):
    """The address a command will connect to (its flag, else RAY_ADDRESS), checked."""
    if flag_value:
        return ray_address(flag_value, flag)
    if os.environ.get("RAY_ADDRESS"):
        return ray_address(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
    return None


# ----------------------------------------------------------------------------------------------
# YAML files (configs and search spaces)

# PyYAML builds each anchored value once and shares it, so nested aliases (a "billion laughs"
# document) load in microseconds and then explode in whatever walks the result: repr in an error
# message, json.dumps of the config. Real configs and search spaces use a handful of aliases and
# a few hundred values, so documents past these bounds are refused before they are built.
YAML_MAX_ALIASES = 100
YAML_MAX_NODES = 10_000


class YAMLLimitError(ValueError):
    """A YAML document past YAML_MAX_ALIASES / YAML_MAX_NODES, or nested too deeply to read;
    the message says which, without naming the source (the caller does)."""


def _yaml_children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_yaml_size(root) -> None:
    """YAMLLimitError when the composed node graph, with every alias expanded, is past the
    bounds.  Iterative, and each node's expanded size is computed once, so a bomb is measured
    in time linear in its text and stops at the first bound it crosses."""
    sizes = {}  # id(node) -> its size with aliases expanded, once finished
    open_ids = {id(root)}  # nodes whose children are being walked: an alias to one is a cycle
    stack = [[root, iter(_yaml_children(root)), 1]]
    aliases = 0

    def too_many():
        through = " through YAML aliases" if aliases else ""
        return YAMLLimitError(
            f"it expands to more than {YAML_MAX_NODES} values{through}; a config "
            "or search space holds a few hundred at most"
        )

    while stack:
        frame = stack[-1]
        child = next(frame[1], None)
        if child is None:
            stack.pop()
            open_ids.discard(id(frame[0]))
            sizes[id(frame[0])] = frame[2]
            if stack:
                stack[-1][2] += frame[2]
                if stack[-1][2] > YAML_MAX_NODES:
                    raise too_many()
            continue
        if id(child) in open_ids:
            raise YAMLLimitError(
                f"the YAML anchor on line {child.start_mark.line + 1} is used "
                "inside itself (a structure that contains itself)"
            )
        if id(child) in sizes:  # a node reached again: an alias (*name) to it
            aliases += 1
            if aliases > YAML_MAX_ALIASES:
                raise YAMLLimitError(
                    f"it uses more than {YAML_MAX_ALIASES} YAML aliases (*name); "
                    "write the values out"
                )
            frame[2] += sizes[id(child)]
            if frame[2] > YAML_MAX_NODES:
                raise too_many()
            continue
        open_ids.add(id(child))
        stack.append([child, iter(_yaml_children(child)), 1])


def load_yaml_text(text: str, loader=None):
    """yaml.load(text, loader) within YAML_MAX_ALIASES and YAML_MAX_NODES (YAMLLimitError);
    PyYAML's own errors (yaml.YAMLError, and ValueError for values such as 2024-13-45 or an
    int of more than 4300 digits) pass through."""
    import yaml

    reader = (loader or yaml.SafeLoader)(text)
    try:
        try:
            root = reader.get_single_node()
        except RecursionError:  # PyYAML composes nested collections recursively
            raise YAMLLimitError("its collections are nested too deeply to read") from None
        if root is None:
            return None
        _check_yaml_size(root)
        return reader.construct_document(root)
    finally:
        reader.dispose()


def read_yaml(path, what: str, error, loader=None):
    """The parsed YAML file, or `error` (an exception class) with one line naming the file and,
    where the text is at fault, the line."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise error(f"{what} {path} does not exist")
    if p.is_dir():
        raise error(f"{what} {path} is a folder, expected a YAML file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(
            f"{what} {path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
            "save it as UTF-8"
        ) from None
    try:
        return load_yaml_text(text, loader)
    except YAMLLimitError as e:
        raise error(f"{what} {path}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise error(f"{what} {path}: {where}not valid YAML ({problem})") from None
    except ValueError as e:  # a value PyYAML recognises but cannot build
        raise error(f"{what} {path}: a value is not valid YAML ({clipped(e, 160)})") from None


@contextmanager
def staged_folder(out, owned_names=()):
    """Yields a temporary folder next to out to write a report into.  On success each of its files
    replaces out/<name> by rename (atomic per file), and any of owned_names that this run did not
    write is removed from out, so out never mixes two reports; other files in out are left alone.
    On failure the temporary folder goes and out is untouched."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        written = sorted(p.name for p in stage.iterdir() if p.is_file())
        for name in written:
            os.replace(stage / name, out / name)
        for name in owned_names:
            if name not in written and (out / name).is_file():
                (out / name).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
