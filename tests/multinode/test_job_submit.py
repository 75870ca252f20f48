"""Issue 6 end to end: the documented submit path against the local dev cluster, for real.

One dev cluster (`raypose.cluster.dev.up`: `ray start --head` with its dashboard and a moto S3 server on
127.0.0.1, token auth on) serves the whole module. Jobs go in through the `ray` CLI with only the
variables `cluster.env()` gives, the shared cluster/runtime_env.yaml and `--working-dir .`:

  ray job submit ... -- python jobs/tune.py --space search_spaces/smoke.yaml --data DIR
                        --storage s3://BUCKET/sweeps --name e2e ...
  ray job submit ... -- python jobs/evaluate.py s3://BUCKET/sweeps/e2e

and the results are read back over HTTP with s3fs. `raypose cluster check` is tested against the
same cluster for the ways a submit goes wrong (nothing listening, not a dashboard, no token, a
refused token). Teardown stops everything `up` started, and every Ray process seen during the tests
(job drivers, Train workers), and checks by pid that none is left, whatever failed.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from importlib.metadata import version
from pathlib import Path

import pytest

from raypose.cluster import dev as cluster
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
BUCKET = "raypose-e2e"
# Generous fail-safes; on 2 shared cores the sweep takes about 1-2 min, the evaluation under 1 min.
TUNE_TIMEOUT_S = 420
EVALUATE_TIMEOUT_S = 240
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ProcessWatch:
    """Samples the dev cluster's Ray processes (drivers and workers come and go) every few seconds,
    so that teardown can check each one by pid (and start time, against pid reuse)."""

    def __init__(self, state: dict, interval: float = 3.0):
        self.state, self.interval = state, interval
        self.seen = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        psutil = cluster._psutil()
        for process in cluster._ray_processes(
            self.state["ray_process_group"], self.state["ray_temp_dir"], self.state["started_at"]
        ):
            try:
                self.seen.setdefault(process.pid, cluster._record(process))
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a process vanishing mid-scan; the next sample catches up
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def bring_down(state_dir: Path, state: dict | None, watch: ProcessWatch | None) -> None:
    """`cluster.down`, then by pid (and start time): nothing that `up` started, nor any Ray process
    seen while the tests ran, is left."""
    try:
        if watch is not None:
            watch.stop()
            watch.sample()  # the last ones, just before they are stopped
    finally:
        stopped = cluster.down(state_dir)
    if state is None:
        return
    records = list(state["processes"]) + list(watch.seen.values() if watch else [])
    left = [r for r in records if cluster._live_process(r) is not None]
    left += [
        {"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]}
        for p in cluster._ray_processes(
            state["ray_process_group"], state["ray_temp_dir"], state["started_at"]
        )
    ]
    assert left == [], f"processes left after down() (it stopped {sorted(stopped)}): {left}"


@pytest.fixture(scope="module")
def dev_cluster():
    """The dev cluster, up for the whole module; yields {'state', 'env', 'watch', 'state_dir'}."""
    # Short, so that Ray's temp dir fits under it (unix socket paths are limited to 107 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="rp-"))
    local_dir = Path(tempfile.mkdtemp(prefix="rp-local-"))
    # A runner stopped with SIGTERM (`timeout`, CI) unwinds like Ctrl-C, so the finally below runs.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with pytest.MonkeyPatch.context() as mp:
            # Inherited by the Ray head through up(), so by every job's driver:
            # - the sweep's local Optuna study goes to a fresh folder, not ~/.raypose/experiments
            #   (a study of the same name left there would be continued: OptunaSearch loads it);
            # - the entrypoint's `python` is this environment's, even when it is not activated.
            mp.setenv("RAYPOSE_LOCAL_DIR", str(local_dir))
            mp.setenv(
                "PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            )
            state = watch = None
            try:
                state = cluster.up(
                    state_dir,
                    dashboard_port=free_port(),
                    s3_port=free_port(),
                    bucket=BUCKET,
                    num_cpus=2,
                )
                watch = ProcessWatch(state)
                yield {
                    "state": state,
                    "env": cluster.env(state_dir),
                    "watch": watch,
                    "state_dir": state_dir,
                }
            finally:
                bring_down(state_dir, state, watch)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(local_dir, ignore_errors=True)


# --- helpers: the `ray` and `raypose` command lines -------------------------------------------------


def client_env(variables: dict, **changes) -> dict:
    """This process's environment without any Ray or AWS setting of its own (conftest sets a token
    of its own), plus `variables`; a change of None removes that variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "RAYPOSE_"))}
    env.update(variables)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def ray_cli(args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    ray = cluster._find_executable("ray", "install raypose's dependencies")
    return subprocess.run(
        [ray, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def raypose_cli(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raypose.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def job_report(job_id: str, env: dict) -> str:
    """`ray job status` and `ray job logs` of a job, for a failure message."""
    parts = []
    for what in ("status", "logs"):
        try:
            r = ray_cli(["job", what, "--log-color", "false", job_id], env, timeout=60)
            parts.append(
                f"--- ray job {what} {job_id} (exit {r.returncode}) ---\n"
                f"{r.stdout[-12000:]}{r.stderr[-3000:]}"
            )
        except subprocess.TimeoutExpired:
            parts.append(f"--- ray job {what} {job_id}: no answer within 60 s ---")
    return "\n".join(parts)


def submit_and_wait(env: dict, name: str, entrypoint: list, timeout: float) -> str:
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ENTRYPOINT`, blocking
    until the job ends; fails the test with the job's logs unless it SUCCEEDED. Returns the CLI's
    output (the job's log, tailed)."""
    job_id = f"{name}-{uuid.uuid4().hex[:8]}"
    command = [
        "job",
        "submit",
        "--log-color",
        "false",
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        *entrypoint,
    ]
    try:
        result = ray_cli(command, env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        report = job_report(job_id, env)
        ray_cli(["job", "stop", "--no-wait", job_id], env, timeout=60)
        pytest.fail(
            f"job {job_id} did not finish within {timeout} s\n{report}\n"
            f"--- submit output ---\n{(e.stdout or b'')[-3000:]!r}"
        )
    status = ray_cli(["job", "status", "--log-color", "false", job_id], env, timeout=60)
    if result.returncode != 0 or f"Job '{job_id}' succeeded" not in status.stdout:
        pytest.fail(
            f"job {job_id}: `ray job submit` exited {result.returncode}; "
            f"{status.stdout.strip()[-500:]}\n{job_report(job_id, env)}\n"
            f"--- submit stderr ---\n{result.stderr[-3000:]}"
        )
    return result.stdout


def s3(variables: dict):
    import s3fs

    return s3fs.S3FileSystem(
        key=variables["AWS_ACCESS_KEY_ID"],
        secret=variables["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": variables["AWS_ENDPOINT_URL"]},
        skip_instance_cache=True,
    )


# --- `raypose cluster check`: can `ray job submit` get in? -------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("raypose cluster check: ")
    print(lines[0])  # shown with -s: the messages as a user sees them
    return lines[0][len("raypose cluster check: ") :]


def test_check_accepts_the_dev_cluster_with_its_token(dev_cluster):
    variables = dev_cluster["env"]
    result = raypose_cli(["cluster", "check"], client_env(variables))  # address from the env
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"the Ray {version('ray')} cluster at {variables['RAY_API_SERVER_ADDRESS']} "
        f"accepts job submissions with the token from "
        f"RAY_AUTH_TOKEN_PATH={variables['RAY_AUTH_TOKEN_PATH']}"
    )
    assert result.stderr == ""


def test_check_with_no_cluster_says_nothing_answers(dev_cluster):
    # the address set, as `raypose cluster env` leaves it, but nothing runs there any more
    url = f"http://127.0.0.1:{free_port()}"
    env = client_env(dev_cluster["env"], RAY_API_SERVER_ADDRESS=url)
    message = assert_one_line_error(raypose_cli(["cluster", "check"], env))
    assert message == (
        f"no Ray dashboard answers at {url} (connection refused): is the cluster up? Start it "
        f"(`raypose cluster up` for the dev cluster), or check the host and port "
        f"(RAY_API_SERVER_ADDRESS); the dashboard listens on port 8265 unless told otherwise"
    )
    assert ray_cli(["job", "submit", "--no-wait", "--", "true"], env, 60).returncode != 0


@pytest.mark.parametrize(
    "where", ["free port", "S3 port", "GCS port", "ray:// scheme", "no scheme"]
)
def test_check_with_a_wrong_address_names_it(dev_cluster, where):
    state = dev_cluster["state"]
    url = {
        "free port": f"http://127.0.0.1:{free_port()}",
        "S3 port": f"http://127.0.0.1:{state['ports']['s3']}",
        "GCS port": f"http://127.0.0.1:{state['ports']['gcs']}",
        "ray:// scheme": f"ray://127.0.0.1:{state['ports']['dashboard']}",
        "no scheme": f"127.0.0.1:{state['ports']['dashboard']}",
    }[where]
    env = client_env(dev_cluster["env"], RAY_API_SERVER_ADDRESS=None)  # else it wins over --address
    message = assert_one_line_error(raypose_cli(["cluster", "check", "--address", url], env))
    expected = {
        "free port": f"no Ray dashboard answers at {url} (connection refused): is the cluster up?",
        "S3 port": f"something answers at {url} but it is not a Ray dashboard (HTTP ",
        "GCS port": f"something answers at {url} but it is not a Ray dashboard (no HTTP answer",
        "ray:// scheme": f"--address {url}: `ray job submit` talks HTTP to the dashboard, not ray://",
        "no scheme": f"--address {url} has no http://, so `ray job submit` takes it for a GCS address",
    }[where]
    assert message.startswith(expected), message
    assert "--address" in message
    if "scheme" not in where:  # (with those, Ray would go looking through Ray Client or the GCS)
        assert (
            ray_cli(
                ["job", "submit", "--no-wait", "--address", url, "--", "true"], env, 60
            ).returncode
            != 0
        )


def test_check_says_when_the_environment_overrides_address(dev_cluster):
    # Ray 2.60's job client prefers RAY_API_SERVER_ADDRESS to --address: with the dev cluster's
    # variables loaded, `ray job submit --address OTHER` goes to the dev cluster.
    variables = dev_cluster["env"]
    other = f"http://127.0.0.1:{free_port()}"
    env = client_env(variables)
    message = assert_one_line_error(raypose_cli(["cluster", "check", "--address", other], env))
    assert message == (
        f"RAY_API_SERVER_ADDRESS={variables['RAY_API_SERVER_ADDRESS']} overrides "
        f"--address {other}: `ray job submit` uses the variable first; unset "
        f"RAY_API_SERVER_ADDRESS (or set it to the address you mean)"
    )


@pytest.mark.parametrize("case", ["no token anywhere", "empty token file", "missing token file"])
def test_check_with_token_auth_on_and_no_token_says_so(dev_cluster, case, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token either
    home.mkdir()
    token_path = {
        "no token anywhere": None,
        "empty token file": tmp_path / "empty",
        "missing token file": tmp_path / "absent",
    }[case]
    if case == "empty token file":
        token_path.write_text("\n")
    env = client_env(
        dev_cluster["env"],
        HOME=str(home),
        RAY_AUTH_TOKEN_PATH=None if token_path is None else str(token_path),
    )
    message = assert_one_line_error(raypose_cli(["cluster", "check"], env))
    assert message.startswith("token authentication is on but no token was found: ")
    detail = {
        "no token anywhere": f"RAY_AUTH_MODE=token, and neither RAY_AUTH_TOKEN, "
        f"RAY_AUTH_TOKEN_PATH nor {home}/.ray/auth_token gives one",
        "empty token file": f"RAY_AUTH_TOKEN_PATH={token_path} is empty",
        "missing token file": f"RAY_AUTH_TOKEN_PATH={token_path} cannot be read "
        f"(No such file or directory)",
    }[case]
    assert detail in message
    assert message.endswith(
        "set RAY_AUTH_TOKEN_PATH to the cluster's token file (or RAY_AUTH_TOKEN "
        'to the token); for the dev cluster: eval "$(raypose cluster env)"'
    )
    assert ray_cli(["job", "submit", "--no-wait", "--", "true"], env, 60).returncode != 0


def test_check_with_a_wrong_token_says_the_cluster_refused_it(dev_cluster, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env = client_env(dev_cluster["env"], RAY_AUTH_TOKEN_PATH=str(wrong))
    url = dev_cluster["env"]["RAY_API_SERVER_ADDRESS"]
    message = assert_one_line_error(raypose_cli(["cluster", "check"], env))
    assert message == (
        f"the Ray cluster at {url} refused the token from RAY_AUTH_TOKEN_PATH={wrong} (HTTP 403: "
        f"Forbidden: Invalid authentication token): set RAY_AUTH_TOKEN_PATH to the cluster's token "
        f'file (or RAY_AUTH_TOKEN to the token); for the dev cluster: eval "$(raypose cluster env)"'
    )
    assert ray_cli(["job", "submit", "--no-wait", "--", "true"], env, 60).returncode != 0


def test_check_with_token_auth_off_says_the_cluster_wants_one(dev_cluster):
    env = client_env(dev_cluster["env"], RAY_AUTH_MODE=None)
    url = dev_cluster["env"]["RAY_API_SERVER_ADDRESS"]
    message = assert_one_line_error(raypose_cli(["cluster", "check"], env))
    assert message.startswith(
        f"the Ray cluster at {url} requires a token (HTTP 401) but none was "
        f"sent: token authentication is off on this side; set "
        f"RAY_AUTH_MODE=token and "
    )
    assert ray_cli(["job", "submit", "--no-wait", "--", "true"], env, 60).returncode != 0


# --- the jobs ----------------------------------------------------------------------------------------

PROBE = """
import json, os, ray, raypose
ray.init()
@ray.remote
def seen_by_a_worker():
    import raypose
    return {"raypose": raypose.__file__, "cwd": os.getcwd(),
            "endpoint": os.environ.get("AWS_ENDPOINT_URL"), "key": os.environ.get("AWS_ACCESS_KEY_ID")}
print("PROBE " + json.dumps({"driver": {"raypose": raypose.__file__, "cwd": os.getcwd(),
                                        "endpoint": os.environ.get("AWS_ENDPOINT_URL")},
                             "worker": ray.get(seen_by_a_worker.remote())}))
"""


def test_job_runs_the_uploaded_working_dir_with_the_clusters_s3_settings(dev_cluster):
    """The driver and a worker import raypose from the uploaded copy (not this checkout's editable
    install) and see the S3 endpoint the cluster was started with; the upload is small."""
    variables = dev_cluster["env"]
    output = submit_and_wait(client_env(variables), "probe", ["python", "-c", PROBE], 180)
    seen = json.loads(
        next(line for line in output.splitlines() if line.startswith("PROBE "))[len("PROBE ") :]
    )
    uploaded = Path(seen["driver"]["cwd"])
    assert uploaded != REPO and Path(dev_cluster["state"]["ray_temp_dir"]) in uploaded.parents
    for side in ("driver", "worker"):
        assert Path(seen[side]["raypose"]) == uploaded / "raypose" / "__init__.py", seen
        assert seen[side]["endpoint"] == variables["AWS_ENDPOINT_URL"]
    assert seen["worker"]["key"] == cluster.LOCAL_S3_CREDENTIAL
    # What went up: the code, nothing of the environment, the history or data.
    files = [p for p in uploaded.rglob("*") if p.is_file()]
    names = {p.relative_to(uploaded).parts[0] for p in files}
    assert {"raypose", "jobs", "search_spaces", "cluster"} <= names
    assert not names & {".venv", ".git", "runs", "data", "raypose.egg-info", ".pytest_cache"}
    assert not any(p.suffix == ".h5" or "__pycache__" in p.parts for p in files)
    assert sum(p.stat().st_size for p in files) < 5 * 1024**2


def test_a_failed_job_fails_the_test_with_its_status_and_logs(dev_cluster):
    entrypoint = ["python", "-c", "import sys; print('raypose-e2e: about to fail'); sys.exit(3)"]
    with pytest.raises(pytest.fail.Exception) as failed:
        submit_and_wait(client_env(dev_cluster["env"]), "fails", entrypoint, 120)
    message = str(failed.value)
    assert "`ray job submit` exited 1" in message
    assert "--- ray job logs fails-" in message and "raypose-e2e: about to fail" in message
    assert "failed" in message.lower()


@pytest.mark.slow
def test_sweep_then_evaluation_submitted_as_jobs_write_their_results_to_s3(dev_cluster, tiny_data):
    variables = dev_cluster["env"]
    env = client_env(variables)
    storage = f"s3://{BUCKET}/sweeps"
    experiment = f"{storage}/e2e"
    # The data: an absolute path on this machine, where the dev cluster's single node runs.
    tune_output = submit_and_wait(
        env,
        "e2e-tune",
        [
            "python",
            "jobs/tune.py",
            "--space",
            "search_spaces/smoke.yaml",
            "--data",
            str(tiny_data),
            "--storage",
            storage,
            "--name",
            "e2e",
            "--samples",
            "2",
            "--epochs",
            "2",
            "--workers-per-trial",
            "2",
            "--set",
            "data.batch_size=8",
        ],
        TUNE_TIMEOUT_S,
    )
    assert "[raypose] best trial" in tune_output

    fs = s3(variables)
    best = json.loads(fs.cat(f"{BUCKET}/sweeps/e2e/best.json"))
    assert best["experiment"] == experiment
    assert len(best["trials"]) == 2
    assert math.isfinite(best["value"]) and best["value"] > 0
    assert best["checkpoint"].startswith(f"{experiment}/train/{best['trial_id']}/")
    assert fs.exists(best["checkpoint"][len("s3://") :] + "/manifest.json")
    assert fs.exists(f"{BUCKET}/sweeps/e2e/optuna.db")

    evaluate_output = submit_and_wait(
        env, "e2e-evaluate", ["python", "jobs/evaluate.py", experiment], EVALUATE_TIMEOUT_S
    )
    assert "[raypose] mean over actions: MPJPE" in evaluate_output

    evaluations = fs.glob(f"{BUCKET}/sweeps/e2e/train/*/evaluation-*")
    assert len(evaluations) == 1, evaluations
    folder = evaluations[0]
    assert folder.startswith(best["checkpoint"][len("s3://") :].rsplit("/", 1)[0] + "/evaluation-")
    names = {p.rsplit("/", 1)[1] for p in fs.ls(folder, detail=False)}
    pngs = {"skeletons.png", "joint_errors.png", "sweep_history.png", "param_importance.png"}
    assert {"report.json", "report.md", "predictions.npz"} | pngs <= names, names
    for png in pngs:
        assert fs.cat(f"{folder}/{png}")[:8] == PNG_MAGIC, png
    report = json.loads(fs.cat(f"{folder}/report.json"))
    assert report["checkpoint"] == best["checkpoint"]
    assert report["experiment"] == experiment
    assert report["trial_id"] == best["trial_id"]
    assert report["test_samples"] == 40
    assert math.isfinite(report["mean_over_actions"]["mpjpe"])
    assert report["outputs"]["storage"] == f"s3://{folder}"
    assert fs.cat(f"{folder}/report.md").decode().startswith("# raypose evaluation")


# --- Ray Client: `--address ray://HOST:PORT` for train, tune and evaluate ---------------------------


def raypose_client_run(args: list, env: dict, timeout: float) -> str:
    """`raypose ARGS` as a Ray Client driver; fails the test with its output unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "raypose.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"raypose {args[0]} exited {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    )
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    return done.stdout


@pytest.mark.long  # out of .ci/run's time budget: `python -m pytest -m long`
def test_train_tune_and_evaluate_through_ray_client(dev_cluster, tiny_data, tmp_path):
    """The dev cluster's head runs Ray Client's server; every command connects to it with
    ray://127.0.0.1:PORT, with storage in the cluster's S3 bucket."""
    variables = dev_cluster["env"]
    address = f"ray://127.0.0.1:{dev_cluster['state']['ports']['client']}"
    env = client_env(
        variables, RAYPOSE_LOCAL_DIR=str(tmp_path / "local"), RAYPOSE_LOG_DIR=str(tmp_path / "logs")
    )
    storage = f"s3://{BUCKET}/client"
    common = [
        "--data",
        str(tiny_data),
        "--storage",
        storage,
        "--set",
        "data.batch_size=8",
        "--address",
        address,
    ]

    out = raypose_client_run(
        ["train", "--name", "run", "--epochs", "2", "--workers", "2", *common],
        env,
        timeout=TUNE_TIMEOUT_S,
    )
    epochs = [line for line in out.splitlines() if line.startswith("[raypose] epoch ")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"], out  # each line once
    assert "[raypose] run run: 2 epochs" in out
    fs = s3(variables)
    assert fs.exists(f"{BUCKET}/client/run/epoch_0002/manifest.json")

    out = raypose_client_run(
        [
            "tune",
            "--space",
            "search_spaces/smoke.yaml",
            "--name",
            "sweep",
            "--samples",
            "2",
            "--epochs",
            "2",
            "--max-concurrent",
            "1",
            *common,
        ],
        env,
        timeout=TUNE_TIMEOUT_S,
    )
    assert "[raypose] best trial " in out, out
    best = json.loads(fs.cat(f"{BUCKET}/client/sweep/best.json"))
    assert len(best["trials"]) == 2

    out = raypose_client_run(
        [
            "evaluate",
            f"{storage}/sweep",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "eval"),
            "--address",
            address,
        ],
        env,
        timeout=EVALUATE_TIMEOUT_S,
    )
    assert f"as a Ray task on {address}" in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["checkpoint"] == best["checkpoint"]
    assert report["outputs"]["local"] == str((tmp_path / "eval").resolve())
    assert fs.exists(report["outputs"]["storage"][len("s3://") :] + "/report.json")
