"""`raypose cluster up|down|env|check`: a local dev cluster on 127.0.0.1, so that the submit path is real.

`up` starts a Ray head (`ray start --head`, dashboard and job server on 127.0.0.1) and a moto S3 server
(`moto_server -H 127.0.0.1`), creates the bucket, and records what it started in
<state dir>/state.json; `env` prints the shell variables that point `ray job submit`, s3fs and raypose
at them; `down` stops exactly the processes `up` started.

Token authentication stays on: `up` writes a token of its own to <state dir>/auth_token (mode 0600)
and starts Ray with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at it, so nothing is read
from or written to ~/.ray. A client needs the same two variables (Ray then sends
`Authorization: Bearer <token>` to the dashboard and the token on every gRPC call); `env` prints them.

Ray gets a temp dir of its own (--temp-dir), so its `ray_current_cluster` file never makes another
`ray.init()` on this machine attach to the dev cluster. `down` never runs `ray stop`: that kills every
Ray process of the user on the machine, whatever instance it belongs to. It stops the recorded
processes instead: all of them share one process group (`ray start` runs in a new session), and
their command lines name the dedicated temp dir.

`check` probes any Ray cluster the way `ray job submit` would reach it (same address and token
lookup) and prints one line: that it answers, or what is wrong (nothing listening, not a Ray
dashboard, no token, a refused token) and what to do, where `ray job submit` prints a traceback.
"""

import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_S3_PORT = 9000
DEFAULT_BUCKET = "raypose"
# Dummy credentials, accepted by the loopback moto server only; never a real account's.
LOCAL_S3_CREDENTIAL = "raypose-local"
LOCAL_S3_REGION = "us-east-1"
# Ray's default worker port range; a dashboard port inside it collides with worker ports.
RAY_WORKER_PORTS = (10002, 19999)
STATE_FILE = "state.json"
TOKEN_FILE = "auth_token"
# Unix socket paths are limited to 107 bytes; Ray puts
# <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store under the temp dir.
MAX_RAY_TEMP_DIR_CHARS = 40
# Variables of the caller that must not leak into the dev cluster: another cluster's address or
# token, and real AWS credentials (the dev cluster talks to moto only).
SCRUBBED_VARIABLES = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
)


class ClusterError(RuntimeError):
    """A dev-cluster problem; the message says what, where (flag, port, file) and what to do."""


class ClusterInputError(ClusterError, ValueError):
    """A flag of `raypose cluster` that no cluster could take (a port past 65535, a bad bucket
    name): refused before anything is read, written or started, with exit code 2."""


def _psutil():
    """psutil, imported when needed (a dependency of raypose)."""
    import psutil

    return psutil


def default_state_dir() -> Path:
    return Path(os.environ.get("RAYPOSE_STATE_DIR") or Path.home() / ".raypose" / "dev-cluster")


def read_state(state_dir) -> dict | None:
    """The state `up` recorded, or None when there is none."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ClusterError(
            f"{path}: unreadable dev-cluster state ({e}); stop any leftover processes "
            f"by hand and delete the file"
        ) from e


def _write_state(state_dir: Path, state: dict) -> None:
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


# --- processes ------------------------------------------------------------------------------------


def _record(process) -> dict:
    return {"pid": process.pid, "name": process.name(), "create_time": process.create_time()}


def _live_process(record: dict):
    """The psutil.Process for a recorded pid if it is still the same, running process; else None."""
    psutil = _psutil()
    try:
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["create_time"]) > 1.0:
            return None  # the pid was reused by another process
        if process.status() == psutil.STATUS_ZOMBIE:
            return None  # exited, waiting to be reaped by its parent
        return process
    except psutil.Error:
        return None


def _ray_processes(group: int, temp_dir: str, since: float) -> list:
    """The processes of the Ray instance started in process group `group` with `temp_dir`.

    A process is counted when it belongs to this user, was started at or after `since`, looks like
    Ray, and either is in the group or names the temp dir on its command line; then all their
    descendants (workers forked by the raylet) are added."""
    psutil = _psutil()
    uid = os.getuid()
    found = {}
    for process in psutil.process_iter(["pid", "cmdline", "create_time", "uids"]):
        info = process.info
        if process.pid == os.getpid() or not info["uids"] or info["uids"].real != uid:
            continue
        if info["create_time"] is None or info["create_time"] < since - 1.0:
            continue
        command = " ".join(info["cmdline"] or [])
        try:
            in_group = os.getpgid(process.pid) == group
        except OSError:
            continue
        if (in_group and "ray" in command.lower()) or (temp_dir and temp_dir in command):
            found[process.pid] = process
    for process in list(found.values()):
        try:
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    alive = []
    for process in found.values():
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def _terminate(processes: list, timeout: float) -> list:
    """SIGTERM, wait up to `timeout` s, then SIGKILL what is left. Returns the pids that were alive."""
    psutil = _psutil()
    signalled = []
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
            signalled.append(process)
        except psutil.Error:
            pass
    _, still_alive = psutil.wait_procs(signalled, timeout=timeout)
    still_alive = [p for p in still_alive if _not_zombie(p)]
    for process in still_alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still_alive, timeout=5)
    return [p.pid for p in signalled]


def _not_zombie(process) -> bool:
    psutil = _psutil()
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_ray(processes: list, timeout: float = 10.0) -> list:
    """Stops a Ray instance's processes in Ray's own order: raylet, then the rest, then the GCS."""

    def name(process):
        try:
            return process.name()
        except Exception:
            return ""

    raylet = [p for p in processes if name(p) == "raylet"]
    gcs = [p for p in processes if name(p) == "gcs_server"]
    rest = [p for p in processes if p not in raylet and p not in gcs]
    stopped = []
    for bucket in (raylet, rest, gcs):
        stopped += _terminate(bucket, timeout)
    return stopped


def _recorded_and_found(state: dict) -> tuple[list, list]:
    """(live moto processes, live Ray processes) of a recorded dev cluster."""
    moto = [p for p in (_live_process(r) for r in state["processes"] if r["role"] == "moto") if p]
    ray_records = [r for r in state["processes"] if r["role"] == "ray"]
    ray = {p.pid: p for p in (_live_process(r) for r in ray_records) if p}
    for process in _ray_processes(
        state["ray_process_group"], state["ray_temp_dir"], state["started_at"]
    ):
        ray.setdefault(process.pid, process)
    return moto, list(ray.values())


def _is_running(state: dict) -> bool:
    return any(_live_process(r) for r in state["processes"])


# --- ports, files, executables ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port_number(port: int, flag: str) -> None:
    if not 1 <= port <= 65535:
        raise ClusterInputError(f"{flag} {port}: not a TCP port (1-65535)")


def _check_port(port: int, flag: str) -> None:
    _check_port_number(port, flag)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ClusterError(
                f"port {port} on 127.0.0.1 is already in use ({e.strerror}); "
                f"free it or choose another with {flag}"
            ) from e


def _find_executable(name: str, install_hint: str) -> str:
    """`name` on PATH, or next to this Python (a virtual environment that is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise ClusterError(f"`{name}` not found on PATH or next to {sys.executable}; {install_hint}")


def _ensure_token(state_dir: Path) -> Path:
    """The dev cluster's own token file; created once (mode 0600) and kept across up/down."""
    path = state_dir / TOKEN_FILE
    if path.exists() and path.read_text().strip():
        return path
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _ray_temp_dir(state_dir: Path) -> Path:
    """<state dir>/ray, or a short directory under the system temp dir when that path is too long
    for Ray's unix sockets (recorded in the state file either way)."""
    preferred = state_dir / "ray"
    if len(str(preferred)) <= MAX_RAY_TEMP_DIR_CHARS:
        return preferred
    return Path(
        tempfile.mkdtemp(prefix="raypose-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_http(
    url: str, timeout: float, headers=None, process=None, log=None, what="server"
) -> None:
    """Polls `url` until it answers 200; fails early when `process` exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ClusterError(
                f"{what} exited with code {process.returncode} while starting; "
                f"its log {log}:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers or {}), timeout=5
            ) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.25)
    raise ClusterError(
        f"{what} did not answer {url} within {timeout:.0f} s (last error: {last})"
        + (f"; its log {log}:\n{_tail(log)}" if log else "")
    )


# --- the three commands -----------------------------------------------------------------------------


def _client_env(dashboard_port: int, s3_port: int, bucket: str, token_path: Path) -> dict:
    return {
        # `ray job submit|status|logs|stop` and JobSubmissionClient read this before RAY_ADDRESS.
        # RAY_ADDRESS is left alone: an http:// value makes every ray.init() in the shell fail
        # (ray/client_builder.py), and a GCS address on 127.0.0.1 is rewritten by Ray to this
        # machine's outward address, where the dev cluster does not listen.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": LOCAL_S3_CREDENTIAL,
        "AWS_SECRET_ACCESS_KEY": LOCAL_S3_CREDENTIAL,
        "AWS_DEFAULT_REGION": LOCAL_S3_REGION,
        "RAYPOSE_STORAGE": f"s3://{bucket}",
    }


def check_up_flags(
    dashboard_port: int, s3_port: int, bucket: str, num_cpus: int | None, ray_port: int | None
) -> None:
    """`cluster up`'s flags on their own (no port is tried here): ClusterInputError naming the
    flag."""
    from raypose.validate import shown

    if num_cpus is not None and num_cpus < 1:
        raise ClusterInputError(f"--num-cpus {num_cpus}: must be at least 1")
    if not bucket or bucket != bucket.lower() or not 3 <= len(bucket) <= 63 or "/" in bucket:
        raise ClusterInputError(
            f"--bucket {shown(bucket)}: an S3 bucket name is 3-63 lowercase characters, without '/'"
        )
    _check_port_number(dashboard_port, "--dashboard-port")
    _check_port_number(s3_port, "--s3-port")
    if ray_port:  # 0 or none: a free port
        _check_port_number(ray_port, "--ray-port")
    if dashboard_port == s3_port:
        raise ClusterInputError(
            f"--dashboard-port and --s3-port are both {s3_port}; give them different ports"
        )
    if RAY_WORKER_PORTS[0] <= dashboard_port <= RAY_WORKER_PORTS[1]:
        raise ClusterInputError(
            f"--dashboard-port {dashboard_port} is inside Ray's worker port "
            f"range {RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}; choose a port "
            "outside it"
        )


def up(
    state_dir=None,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    s3_port: int = DEFAULT_S3_PORT,
    bucket: str = DEFAULT_BUCKET,
    num_cpus: int | None = None,
    ray_port: int | None = None,
    timeout: float = 120.0,
) -> dict:
    """Starts the dev cluster and returns its state (ports, pids, env); if it is already running,
    returns the recorded state with "already_running": True and starts nothing."""
    # The flags first, before anything is read, started or written.
    check_up_flags(dashboard_port, s3_port, bucket, num_cpus, ray_port)
    num_cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = read_state(state_dir)
    if state is not None:
        if _is_running(state):
            return {**state, "already_running": True}
        down(state_dir)  # stale: its processes are gone; clear leftovers and the state file

    # Everything else that can be checked is checked before anything starts.
    ray_exe = _find_executable("ray", "install raypose's dependencies (pip install -e .)")
    moto_exe = _find_executable(
        "moto_server", "install the test extra: pip install -e '.[test]' (it brings moto[server])"
    )
    _check_port(dashboard_port, "--dashboard-port")
    _check_port(s3_port, "--s3-port")
    if ray_port:
        _check_port(ray_port, "--ray-port")
    gcs_port = ray_port or _free_port()
    client_port = _free_port()  # Ray Client's server: ray://127.0.0.1:<port>

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    token_path = _ensure_token(state_dir)
    client_env = _client_env(dashboard_port, s3_port, bucket, token_path)
    child_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_VARIABLES}
    child_env.update({k: v for k, v in client_env.items() if k != "RAY_API_SERVER_ADDRESS"})
    # Keeps every Ray address on loopback: without it `ray start` swaps 127.0.0.1 for this
    # machine's outward address (a single-node cluster never needs another node to reach it).
    child_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    child_env["RAY_USAGE_STATS_ENABLED"] = "0"
    # jobs run `python ...` from the head's PATH: put this interpreter's folder first, so a job
    # finds raypose's environment even when the virtual environment was not activated
    child_env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), child_env.get("PATH", "")]
    )

    started_at = time.time()
    moto_log = logs / "moto_server.log"
    moto = None
    ray_temp_dir = None
    group = None
    try:
        with open(moto_log, "ab") as log:
            moto = subprocess.Popen(
                [moto_exe, "-H", "127.0.0.1", "-p", str(s3_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
            )
        endpoint = client_env["AWS_ENDPOINT_URL"]
        _wait_http(endpoint + "/", 30, process=moto, log=moto_log, what="moto_server")
        _create_bucket(endpoint, bucket)

        ray_temp_dir = _ray_temp_dir(state_dir)
        ray_log = logs / "ray_start.log"
        command = [
            ray_exe,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--ray-client-server-port",
            str(client_port),
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            str(ray_temp_dir),
            "--disable-usage-stats",
            "--log-style",
            "record",
            "--log-color",
            "false",
        ]
        with open(ray_log, "ab") as log:
            log.write(("$ " + shlex.join(command) + "\n").encode())
            log.flush()
            starter = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
            )
            group = starter.pid  # its session and process group, inherited by every Ray process
            try:
                code = starter.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                starter.kill()
                raise ClusterError(
                    f"`ray start` did not finish within {timeout:.0f} s; "
                    f"its log {ray_log}:\n{_tail(ray_log)}"
                ) from None
        if code != 0:
            raise ClusterError(
                f"`ray start` failed with code {code}; its log {ray_log}:\n{_tail(ray_log)}"
            )
        token = token_path.read_text().strip()
        dashboard = client_env["RAY_API_SERVER_ADDRESS"]
        auth = {"Authorization": f"Bearer {token}"}
        _wait_http(
            dashboard + "/api/version", timeout, headers=auth, log=ray_log, what="Ray dashboard"
        )
        _wait_http(
            dashboard + "/api/jobs/", timeout, headers=auth, log=ray_log, what="Ray job server"
        )

        ray = _ray_processes(group, str(ray_temp_dir), started_at)
        session = ray_temp_dir / "session_latest"
        state = {
            "state_dir": str(state_dir),
            "started_at": started_at,
            "ray_temp_dir": str(ray_temp_dir),
            "ray_session_dir": str(session.resolve()) if session.exists() else None,
            "ray_process_group": group,
            "ports": {
                "dashboard": dashboard_port,
                "s3": s3_port,
                "gcs": gcs_port,
                "client": client_port,
            },
            "bucket": bucket,
            "num_cpus": num_cpus,
            "processes": (
                [{"role": "moto", **_record(_psutil().Process(moto.pid))}]
                + [{"role": "ray", **_record(p)} for p in ray]
            ),
            "logs": {
                "moto_server": str(moto_log),
                "ray_start": str(ray_log),
                "ray": str(ray_temp_dir / "session_latest" / "logs"),
            },
            "env": client_env,
        }
        _write_state(state_dir, state)
        return state
    except BaseException:
        # Leave nothing behind: what this call started goes, whatever failed.
        if group is not None:
            _stop_ray(_ray_processes(group, str(ray_temp_dir), started_at), timeout=5)
        if moto is not None and moto.poll() is None:
            _terminate([_psutil().Process(moto.pid)], timeout=5)
        raise


def _create_bucket(endpoint: str, bucket: str) -> None:
    """Creates the bucket over HTTP, as any S3 client would."""
    import s3fs

    # No region_name: s3fs would send it as a LocationConstraint, which us-east-1 rejects.
    fs = s3fs.S3FileSystem(
        key=LOCAL_S3_CREDENTIAL,
        secret=LOCAL_S3_CREDENTIAL,
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
    )
    try:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        created = fs.exists(bucket)
    except OSError as e:
        raise ClusterError(f"--bucket {bucket!r}: could not create it on {endpoint}: {e}") from e
    if not created:
        raise ClusterError(f"--bucket {bucket!r}: not found on {endpoint} after creating it")


def down(state_dir=None, timeout: float = 10.0) -> list:
    """Stops what `up` recorded in `state_dir` and removes the state file; returns the pids stopped
    ([] when nothing was running)."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = read_state(state_dir)
    if state is None:
        return []
    moto, ray = _recorded_and_found(state)
    stopped = _stop_ray(ray, timeout=timeout) + _terminate(moto, timeout=timeout)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def env(state_dir=None) -> dict:
    """The variables that point Ray's job CLI, s3fs and raypose at the running dev cluster."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = read_state(state_dir)
    if state is None or not _is_running(state):
        raise ClusterError(
            f"no dev cluster is running (state dir {state_dir}); "
            f"start one with `raypose cluster up`"
        )
    return dict(state["env"])


def shell_lines(variables: dict) -> list:
    """`export` lines for a POSIX shell, then an `unset` of the two variables that would win over
    them: RAY_AUTH_TOKEN over the token file, AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL."""
    return [f"export {k}={shlex.quote(str(v))}" for k, v in variables.items()] + [
        "unset RAY_AUTH_TOKEN AWS_ENDPOINT_URL_S3"
    ]


# --- check: can `ray job submit` reach a cluster? ---------------------------------------------------

SUBMIT_ADDRESS_HINT = "give the dashboard's address, http://HEAD:8265"
TOKEN_HINT = (
    "set RAY_AUTH_TOKEN_PATH to the cluster's token file (or RAY_AUTH_TOKEN to the token); "
    'for the dev cluster: eval "$(raypose cluster env)"'
)


def _submit_address(address: str | None) -> tuple[str, str]:
    """(dashboard URL, where it came from), chosen as `ray job submit` chooses it: Ray 2.60's job
    client takes RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, over --address. Only http(s) URLs are
    checked: without a scheme Ray takes the address for a GCS one, and ray:// for Ray Client."""
    given = (address or "").strip()
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "").strip()
        if value:
            if given and given.rstrip("/") != value.rstrip("/"):
                raise ClusterError(
                    f"{name}={value} overrides --address {given}: `ray job submit` "
                    f"uses the variable first; unset {name} (or set it to the "
                    f"address you mean)"
                )
            source = name
            break
    else:
        value, source = given, "--address"
    if not value:
        raise ClusterError(
            "no address to check: pass --address http://HEAD:8265 (the dashboard's "
            "address) or set RAY_API_SERVER_ADDRESS"
        )
    value = value.rstrip("/")
    if "://" not in value:
        raise ClusterError(
            f"{source} {value} has no http://, so `ray job submit` takes it for a GCS "
            f"address and asks that for the dashboard's; {SUBMIT_ADDRESS_HINT}"
        )
    parsed = urllib.parse.urlparse(value)
    if parsed.scheme not in ("http", "https"):
        raise ClusterError(
            f"{source} {value}: `ray job submit` talks HTTP to the dashboard, "
            f"not {parsed.scheme}://; {SUBMIT_ADDRESS_HINT}"
        )
    try:
        _ = parsed.port  # raises for a port that is not a number or past 65535
    except ValueError:
        raise ClusterError(f"{source} {value}: not a valid port; {SUBMIT_ADDRESS_HINT}") from None
    if not parsed.hostname:
        raise ClusterError(f"{source} {value}: no host; {SUBMIT_ADDRESS_HINT}")
    return value, source


def _client_token() -> tuple[str | None, str]:
    """(token or None, where it came from), found as Ray's client finds it: only with
    RAY_AUTH_MODE=token, from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (which must
    then hold it), else ~/.ray/auth_token. Raises ClusterError when token auth is on and none is found."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return None, "RAY_AUTH_MODE is not token"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(
                f"token authentication is on but no token was found: "
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror}); "
                f"{TOKEN_HINT}"
            ) from None
        if not token:
            raise ClusterError(
                f"token authentication is on but no token was found: "
                f"RAY_AUTH_TOKEN_PATH={path} is empty; {TOKEN_HINT}"
            )
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        token = ""
    if token:
        return token, str(default)
    raise ClusterError(
        f"token authentication is on but no token was found: RAY_AUTH_MODE=token, "
        f"and neither RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH nor {default} gives one; "
        f"{TOKEN_HINT}"
    )


def check_submit_target(address: str | None = None, timeout: float = 5.0) -> str:
    """Whether `ray job submit` can reach the cluster at `address` (default: as the CLI finds it).

    Asks the dashboard's /api/version with the token Ray's client would send. Returns one line
    saying so; raises ClusterError with one line saying what is wrong and what to do."""
    url, source = _submit_address(address)
    token, token_source = _client_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url + "/api/version", headers=headers)
    not_ray = (
        f"something answers at {url} but it is not a Ray dashboard ({{}}): check the host and "
        f"port ({source}); {SUBMIT_ADDRESS_HINT}"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as e:
        text = e.read(300).decode(errors="replace").strip()
        if e.code == 401 and token is None:
            raise ClusterError(
                f"the Ray cluster at {url} requires a token (HTTP 401) but none was "
                f"sent: token authentication is off on this side; set "
                f"RAY_AUTH_MODE=token and {TOKEN_HINT}"
            ) from None
        if e.code in (401, 403) and "token" in text.lower():
            raise ClusterError(
                f"the Ray cluster at {url} refused the token from {token_source} "
                f"(HTTP {e.code}: {text.splitlines()[0] if text else e.reason}): "
                f"{TOKEN_HINT}"
            ) from None
        raise ClusterError(not_ray.format(f"HTTP {e.code} {e.reason} on /api/version")) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ConnectionRefusedError):
            raise ClusterError(
                f"no Ray dashboard answers at {url} (connection refused): is the "
                f"cluster up? Start it (`raypose cluster up` for the dev cluster), "
                f"or check the host and port ({source}); the dashboard listens on "
                f"port {DEFAULT_DASHBOARD_PORT} unless told otherwise"
            ) from None
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise ClusterError(
                f"no answer from {url} within {timeout:g} s: check the host, port "
                f"({source}) and firewall; {SUBMIT_ADDRESS_HINT}"
            ) from None
        if isinstance(reason, socket.gaierror):
            raise ClusterError(
                f"cannot resolve the host of {url} ({reason.strerror}): check "
                f"{source}; {SUBMIT_ADDRESS_HINT}"
            ) from None
        raise ClusterError(
            f"cannot reach {url} ({reason}): check {source}; {SUBMIT_ADDRESS_HINT}"
        ) from None
    except TimeoutError:
        raise ClusterError(
            f"no answer from {url} within {timeout:g} s: check the host, port "
            f"({source}) and firewall; {SUBMIT_ADDRESS_HINT}"
        ) from None
    except (
        OSError,
        ValueError,
        http.client.HTTPException,
    ) as e:  # e.g. a gRPC or other non-HTTP port
        raise ClusterError(not_ray.format(f"no HTTP answer: {type(e).__name__}")) from None
    try:
        version = json.loads(body)["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(not_ray.format("/api/version gave no ray_version")) from None
    auth = f"with the token from {token_source}" if token else "without a token"
    return f"the Ray {version} cluster at {url} accepts job submissions {auth}"


# --- command line -------------------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "action",
        choices=["up", "down", "env", "check"],
        help="up: start Ray head + S3 server; down: stop them; env: print shell "
        "exports; check: can `ray job submit` reach a cluster (any cluster, "
        "not only the dev one) with the token it would send?",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="check: the dashboard URL, http://HEAD:8265 (default: "
        "RAY_API_SERVER_ADDRESS or RAY_ADDRESS, which `ray job submit` "
        "prefers to its own --address)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where the state file, token and logs live "
        "(default: $RAYPOSE_STATE_DIR or ~/.raypose/dev-cluster)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help="Ray dashboard and job server port on 127.0.0.1 (default: %(default)s)",
    )
    parser.add_argument(
        "--s3-port",
        type=int,
        default=DEFAULT_S3_PORT,
        help="moto S3 server port on 127.0.0.1 (default: %(default)s)",
    )
    parser.add_argument(
        "--bucket",
        default=DEFAULT_BUCKET,
        help="bucket created on the S3 server (default: %(default)s)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs the Ray head offers (default: this machine's count)",
    )
    parser.add_argument(
        "--ray-port", type=int, default=None, help="the Ray head's GCS port (default: a free port)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for Ray and its dashboard to start (default: %(default)s)",
    )


def run(args):
    state_dir = Path(args.state_dir or default_state_dir()).expanduser().resolve()
    hint = "raypose cluster env" + (
        ""
        if state_dir == default_state_dir().expanduser().resolve()
        else f" --state-dir {shlex.quote(str(state_dir))}"
    )
    try:
        if args.action == "up":
            state = up(
                state_dir,
                dashboard_port=args.dashboard_port,
                s3_port=args.s3_port,
                bucket=args.bucket,
                num_cpus=args.num_cpus,
                ray_port=args.ray_port,
                timeout=args.timeout,
            )
            ports = state["ports"]
            # Every line but the exports is a comment, so `eval "$(raypose cluster up)"` works too.
            print(
                f"# dev cluster {'already running' if state.get('already_running') else 'up'}"
                f" (state in {state_dir})"
            )
            print(
                f"#   Ray dashboard  http://127.0.0.1:{ports['dashboard']}  "
                f"(token in {state['env']['RAY_AUTH_TOKEN_PATH']})"
            )
            print(
                f"#   S3 (moto)      http://127.0.0.1:{ports['s3']}  bucket s3://{state['bucket']}"
            )
            print(f"#   logs           {state_dir / 'logs'}, {state['logs']['ray']}")
            print("\n".join(shell_lines(state["env"])))
            print(f'# load these into your shell: eval "$({hint})"')
        elif args.action == "down":
            state = read_state(state_dir)
            if state is None:
                print(f"no dev cluster is running (no state in {state_dir})")
                return 0
            stopped = down(state_dir)
            if stopped:
                print(
                    f"stopped the dev cluster in {state_dir}: {len(stopped)} processes "
                    f"(pids {' '.join(map(str, sorted(stopped)))})"
                )
            else:
                print(f"the dev cluster in {state_dir} was no longer running; removed its state")
            print("# in shells that loaded its variables: unset " + " ".join(state["env"]))
        elif args.action == "check":
            print(check_submit_target(args.address))
        else:
            print("\n".join(shell_lines(env(state_dir))))
        return 0
    except ClusterInputError as e:  # bad input: the error contract's one line and exit code 2
        print(f"raypose cluster {args.action}: error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"raypose cluster {args.action}: {e}", file=sys.stderr)
        return 1
