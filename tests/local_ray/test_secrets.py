"""No credential value reaches a file that raypose or Ray writes. A marker secret stands in for
the user's AWS credentials (moto accepts any), and after a train run, a sweep and an evaluation,
each its own `raypose` process with its own Ray instance, the marker is looked for in every file
of Ray's temp folder (session logs, the runtime-env agent's log among them), raypose's logs, the
local study cache, the evaluation's output and every object in the bucket. The key that seals
the sweep's Tune state (raypose.storage.seal) is a secret too, and is looked for the same way."""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_marker_secret_appears_in_no_file(tiny_data, s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket = s3_bucket
    marker_id = f"AKIDMARKER{uuid.uuid4().hex[:10].upper()}"
    marker_secret = f"raypose-marker-secret-{uuid.uuid4().hex}"
    marker_seal_key = f"raypose-marker-seal-key-{uuid.uuid4().hex}"  # raypose.storage.seal's key
    # short: Ray's Unix socket paths under its temp folder are limited to 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-sec-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID=marker_id,
        AWS_SECRET_ACCESS_KEY=marker_secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        RAY_TMPDIR=str(ray_tmp),
        RAYPOSE_LOG_DIR=str(tmp_path / "logs"),
        RAYPOSE_LOCAL_DIR=str(tmp_path / "local"),
        RAYPOSE_SEAL_KEY=marker_seal_key,
        PYTHONPATH=str(REPO),
    )
    storage = f"s3://{bucket}/exp"
    common = ["--data", str(tiny_data), "--storage", storage, "--set", "data.batch_size=8"]
    commands = [
        ["train", "--name", "run", "--epochs", "1", "--workers", "1", *common],
        [
            "tune",
            "--space",
            str(REPO / "search_spaces" / "smoke.yaml"),
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
        ["evaluate", f"{storage}/sweep", "--data", str(tiny_data), "--out", str(tmp_path / "eval")],
    ]
    try:
        for args in commands:
            done = subprocess.run(
                [sys.executable, "-m", "raypose.cli", *args],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"{args[0]}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
            for stream in (done.stdout, done.stderr):
                assert not any(m in stream for m in (marker_secret, marker_id, marker_seal_key))
        # the places the secret would land: Ray's runtime-env agent logs each trial's env
        agent_logs = list(ray_tmp.rglob("runtime_env_agent.log"))
        assert agent_logs, sorted(str(p) for p in ray_tmp.rglob("*.log"))[:20]
        searched = 0
        leaks = []
        for root in (ray_tmp, tmp_path):
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    searched += 1
                    data = path.read_bytes()
                    if any(m.encode() in data for m in (marker_secret, marker_id, marker_seal_key)):
                        leaks.append(str(path))
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        for key in fs.find(bucket):
            searched += 1
            data = fs.cat(key)
            if any(m.encode() in data for m in (marker_secret, marker_id, marker_seal_key)):
                leaks.append(f"s3://{key}")
        assert searched > 50
        assert leaks == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
