"""The local dev cluster for real: `raypose cluster up` starts a Ray head and a moto S3 server on
127.0.0.1 with token auth, a job submitted with `ray job submit` reaches both, and `down` leaves
none of the processes `up` started."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raypose.cli import main
from raypose.cluster import dev as cluster
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]


def running(record) -> bool:
    """Whether a recorded process still runs (a zombie waiting to be reaped has exited)."""
    return cluster._live_process(record) is not None


@pytest.fixture
def state_dir():
    # Short, so that Ray's temp dir fits under it (unix socket paths are limited to 107 bytes).
    d = Path(tempfile.mkdtemp(prefix="rp-"))
    try:
        yield d
    finally:
        cluster.down(d)  # whatever the test did, nothing it started survives it
        shutil.rmtree(d, ignore_errors=True)


def test_up_serves_dashboard_bucket_and_jobs_then_down_stops_everything(state_dir, tmp_path):
    dashboard_port, s3_port = free_port(), free_port()
    state = None
    try:
        state = cluster.up(
            state_dir,
            dashboard_port=dashboard_port,
            s3_port=s3_port,
            bucket="raypose-dev",
            num_cpus=1,
        )
        assert Path(state["ray_temp_dir"]).parent == state_dir
        token_path = state_dir / "auth_token"
        assert token_path.stat().st_mode & 0o777 == 0o600
        token = token_path.read_text().strip()

        variables = cluster.env(state_dir)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        assert variables == {
            "RAY_API_SERVER_ADDRESS": dashboard,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "AWS_ACCESS_KEY_ID": cluster.LOCAL_S3_CREDENTIAL,
            "AWS_SECRET_ACCESS_KEY": cluster.LOCAL_S3_CREDENTIAL,
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAYPOSE_STORAGE": "s3://raypose-dev",
        }

        # The dashboard answers on loopback, and only with the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(dashboard + "/api/version", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            dashboard + "/api/version", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["ray_version"]

        # The bucket exists, seen over HTTP like any S3 endpoint.
        import s3fs

        fs = s3fs.S3FileSystem(
            key=cluster.LOCAL_S3_CREDENTIAL,
            secret=cluster.LOCAL_S3_CREDENTIAL,
            client_kwargs={"endpoint_url": variables["AWS_ENDPOINT_URL"]},
            skip_instance_cache=True,
        )
        assert fs.exists("raypose-dev")

        # A second `up` finds it running and starts nothing.
        again = cluster.up(state_dir, dashboard_port=dashboard_port, s3_port=s3_port)
        assert again["already_running"] and again["processes"] == state["processes"]

        # The submit path: `ray job submit` with only the variables `env` prints and the shared
        # runtime_env; the job's driver and a task reach the cluster and the bucket.
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "job.py").write_text(
            textwrap.dedent("""
            import os
            import ray
            import s3fs

            ray.init()

            @ray.remote
            def endpoint_seen_by_a_worker():
                return os.environ["AWS_ENDPOINT_URL"]

            endpoint = ray.get(endpoint_seen_by_a_worker.remote())
            s3fs.S3FileSystem().pipe("raypose-dev/from-job.txt", endpoint.encode())
            print("dedup", os.environ["RAY_DEDUP_LOGS"])
        """)
        )
        submit_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "AWS_ENDPOINT_URL")
        }
        submit_env.update(variables)
        ray_exe = cluster._find_executable("ray", "")
        result = subprocess.run(
            [
                ray_exe,
                "job",
                "submit",
                "--working-dir",
                str(job_dir),
                "--runtime-env",
                str(REPO / "cluster" / "runtime_env.yaml"),
                "--",
                "python",
                "job.py",
            ],
            env=submit_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "dedup 0" in result.stdout
        assert fs.cat("raypose-dev/from-job.txt").decode() == variables["AWS_ENDPOINT_URL"]

        stopped = cluster.down(state_dir)
        moto = next(r for r in state["processes"] if r["role"] == "moto")
        assert moto["pid"] in stopped
        assert not (state_dir / cluster.STATE_FILE).exists()
        still_running = [r for r in state["processes"] if running(r)]
        assert still_running == []
        assert (
            cluster._ray_processes(
                state["ray_process_group"], state["ray_temp_dir"], state["started_at"]
            )
            == []
        )
    finally:
        cluster.down(state_dir)
        if state is not None:
            assert not any(running(r) for r in state["processes"])


def test_down_with_nothing_running_says_so(state_dir, capsys):
    assert cluster.down(state_dir) == []
    assert main(["cluster", "down", "--state-dir", str(state_dir)]) == 0
    assert "no dev cluster is running" in capsys.readouterr().out


def test_env_with_nothing_running_fails_clearly(state_dir, capsys):
    assert main(["cluster", "env", "--state-dir", str(state_dir)]) == 1
    assert "no dev cluster is running" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--s3-port", "--dashboard-port"])
def test_up_with_a_busy_port_fails_before_starting_anything(state_dir, capsys, flag):
    ports = {"--s3-port": free_port(), "--dashboard-port": free_port()}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports[flag] = busy.getsockname()[1]
        code = main(
            [
                "cluster",
                "up",
                "--state-dir",
                str(state_dir),
                *[str(x) for item in ports.items() for x in item],
            ]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert flag in err and str(ports[flag]) in err
    # Checked before anything starts: no state, no logs, no Ray temp dir.
    assert sorted(p.name for p in state_dir.iterdir()) == []


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--s3-port", "70000"),
        ("--s3-port", "0"),
        ("--dashboard-port", "65536"),
        ("--ray-port", "99999"),
        ("--s3-port", "-1"),
    ],
)
def test_up_refuses_a_port_outside_1_to_65535_with_exit_2(state_dir, capsys, flag, value):
    """Bad input, not a failure: exit code 2 and the contract's one line, before anything is
    looked up, started or written (the state dir stays empty)."""
    code = main(["cluster", "up", "--state-dir", str(state_dir), flag, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert lines == [f"raypose cluster up: error: {flag} {value}: not a TCP port (1-65535)"]
    assert sorted(p.name for p in state_dir.iterdir()) == []
    with pytest.raises(cluster.ClusterInputError):
        cluster.up(state_dir, **{flag[2:].replace("-", "_"): int(value)})


def test_up_names_a_missing_executable(state_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(cluster.sys, "executable", str(bin_dir / "python"))
    with pytest.raises(cluster.ClusterError, match="`ray` not found"):
        cluster.up(state_dir, dashboard_port=free_port(), s3_port=free_port())
    fake_ray = bin_dir / "ray"
    fake_ray.write_text("#!/bin/sh\nexit 1\n")
    fake_ray.chmod(0o755)
    with pytest.raises(cluster.ClusterError, match="`moto_server` not found.*moto"):
        cluster.up(state_dir, dashboard_port=free_port(), s3_port=free_port())
    assert not (state_dir / cluster.STATE_FILE).exists()
