"""Faults of the object store: S3 taken away in the middle of a worker's checkpoint upload and
brought back. The upload must be retried, the run continue, and no partial checkpoint be recorded
as valid; evaluation refuses a partial checkpoint in one line."""

import json
import time

import pytest

from tests.support import tiny_config
from tests.tcp_proxy import TcpProxy


@pytest.mark.slow
def test_s3_outage_during_checkpoint_upload(ray_local, tiny_data, s3_bucket, monkeypatch, tmp_path):
    import s3fs

    from raypose import storage
    from raypose.cluster.driver import latest_checkpoint, preflight
    from raypose.evaluation.evaluate import EvaluationError, evaluate
    from raypose.storage import checkpoint
    from raypose.train.run import build_trainer

    endpoint, bucket = s3_bucket
    proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
    # the run (driver and workers) reaches S3 only through the proxy; the test reads moto directly
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    # cut the link in the middle of the worker's upload of epoch 2's weights (raypose's upload
    # function, in a background thread of the worker), and bring it back 20 s later; the
    # controller's record of the checkpoints runs into the same outage
    weights = f"/{bucket}/exp/outage/epoch_0002/{checkpoint.MODEL_FILE}".encode()
    proxy.cut_when(b"PUT " + weights)

    def restore():
        while proxy.cut_at is None:
            time.sleep(0.2)
        time.sleep(20)
        proxy.set_mode("pass")

    import threading

    threading.Thread(target=restore, daemon=True).start()
    cfg = tiny_config(
        tiny_data, f"s3://{bucket}/exp", name="outage", schedule__epochs=4, scaling__workers=1
    )
    loc = preflight(cfg)
    start = time.monotonic()
    result = build_trainer(cfg, "outage", loc).fit()
    took = time.monotonic() - start
    proxy.close()
    assert proxy.cut_at is not None, "the worker's upload never passed through the proxy"
    print(f"run with a 20 s S3 outage took {took:.0f} s")
    # the upload was retried once the store was back: epoch 2's weights went up again after the
    # 20 s outage, from the worker's spooled copy
    retried = [line for t, line in proxy.requests if t > proxy.cut_at + 19 and weights in line]
    assert retried, proxy.requests[-20:]

    # the run finished all its epochs
    assert result.metrics["epoch"] == 4
    run = f"{bucket}/exp/outage"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    latest = latest_checkpoint(storage.parse(f"s3://{run}"))
    assert latest is not None and latest.path.endswith("epoch_0004")
    # every checkpoint Ray Train recorded is complete and matches its manifest
    recorded = [c.path for c, _ in result.best_checkpoints]
    assert recorded, "no checkpoint recorded"
    for path in recorded:
        local = tmp_path / path.rsplit("/", 1)[-1]
        direct.get(path.split("://", 1)[-1] if "://" in path else path, str(local), recursive=True)
        checkpoint.verify(local)
    # a folder the cut left without its manifest is not among them, and evaluation refuses it
    names = sorted(p.rsplit("/", 1)[-1] for p in direct.ls(run, refresh=True))
    state_epochs = sorted(
        json.loads(direct.cat(f"{run}/{n}/{checkpoint.STATE_FILE}"))["epoch"]
        for n in names
        if n.startswith("epoch_") and direct.exists(f"{run}/{n}/{checkpoint.MANIFEST_FILE}")
    )
    assert state_epochs == sorted(set(state_epochs))  # no finished epoch recorded twice
    assert state_epochs[-1] == 4
    partial = f"{run}/epoch_partial"
    direct.put_file(str(tiny_data / "test.h5"), f"{partial}/{checkpoint.MODEL_FILE}")
    with pytest.raises(EvaluationError, match=r"no manifest\.json"):
        evaluate(f"s3://{partial}", str(tiny_data), str(tmp_path / "eval"))
