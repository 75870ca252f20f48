"""Shared fixtures: token auth for Ray without touching ~/.ray, a moto S3 server on loopback, a local
Ray instance that is always shut down, and a tiny synthetic dataset made once per session."""

import os
import secrets
import tempfile
import uuid
from pathlib import Path

import pytest

# Ray 2.60 turns on token authentication for a local ray.init(). Tests keep it on, with a token of
# their own in a temp file, so that nothing is written to ~/.ray and auth is exercised for real.
# The test session's folder (token, raypose's log files) is made once, by the pytest process.
# Processes it starts inherit its environment, and some import this module too (a Ray worker that
# unpickles a function defined in a test file): they reuse the folder and leave their
# environment as it is, which a test may have changed on purpose.
_SESSION_DIR_ENV = "RAYPOSE_TEST_SESSION_DIR"
_OWNS_AUTH_DIR = not os.path.isdir(os.environ.get(_SESSION_DIR_ENV, ""))
_AUTH_DIR = (
    Path(tempfile.mkdtemp(prefix="raypose-test-auth-"))
    if _OWNS_AUTH_DIR
    else Path(os.environ[_SESSION_DIR_ENV])
)
_TOKEN_PATH = _AUTH_DIR / "auth_token"
if _OWNS_AUTH_DIR:
    os.environ[_SESSION_DIR_ENV] = str(_AUTH_DIR)
    _TOKEN_PATH.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN_PATH)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    # Dummy credentials only; the S3 endpoint is always a loopback moto server.
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    # a shell that loaded `raypose cluster env` must not leak its addresses into the tests
    for _var in (
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAYPOSE_STORAGE",
    ):
        os.environ.pop(_var, None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    # raypose.console writes its log files under here, not under ~/.raypose
    os.environ["RAYPOSE_LOG_DIR"] = str(_AUTH_DIR / "logs")


from tests.support import free_port  # noqa: E402


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1, reached over HTTP; yields its endpoint URL.

    AWS_ENDPOINT_URL is set for the test so that s3fs (and Ray workers, which inherit the
    driver's environment) find it like any S3-compatible endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        yield endpoint
    finally:
        # moto keeps its buckets in the process, across servers: reset them for the next test
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields (endpoint, bucket name)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    bucket = f"raypose-test-{uuid.uuid4().hex[:8]}"  # fresh even if a reset was missed
    fs.mkdir(bucket)
    yield s3_server, bucket


@pytest.fixture
def ray_local():
    """A local Ray instance with 2 CPUs and its dashboard; always shut down."""
    import ray

    # workers import test helpers (scripted Tune functions) from the tests folder
    tests_dir = Path(__file__).resolve().parent
    folders = [
        tests_dir.parent,
        tests_dir,
        *(tests_dir / g for g in ("unit", "local_ray", "multinode")),
    ]
    pythonpath = os.pathsep.join(str(f) for f in folders)
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset (train.h5 with the validation subject S8, test.h5), made once."""
    from raypose.data.synth import synthesize

    d = tmp_path_factory.mktemp("tiny_data")
    synthesize(str(d), 100, 40, seed=0, progress=False)
    return d


# ----------------------------------------------------------------------------------------------
# The end of the test process
#
# This one process starts and stops a Ray driver (ray.init / ray.shutdown, Cluster) dozens of
# times, which Ray's C++ core worker is not built for: threads of a shut-down session can outlive
# it (ray-project/ray#31145). Once in CI, after every test had passed and pytest had printed its
# summary, the process died of a segmentation fault (exit 139) while the interpreter tore down
# its modules and extension libraries. The result of the run is pytest's exit status: once pytest
# is done, the process runs the atexit handlers, flushes its output and ends with that status,
# without the teardown. Nothing a test checks happens there. A crash during the tests still
# fails the run (pytest's faulthandler prints the threads' tracebacks).
_SESSION = []


def pytest_sessionstart(session):
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if not _SESSION:
        return
    import atexit
    import sys

    status = int(_SESSION[0].exitstatus)
    if status == 0 and _OWNS_AUTH_DIR:
        # the run's token and raypose's log files: kept only when something failed
        import shutil

        shutil.rmtree(_AUTH_DIR, ignore_errors=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
