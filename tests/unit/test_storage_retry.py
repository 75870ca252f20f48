"""The storage filesystem raypose hands to Ray retries an object-store outage: Ray Train's
controller writes its records through it, so one failed request would end a run. Real moto S3
over HTTP, with tests/tcp_proxy.py between the client and the server to take the link away."""

import threading
import time

import pytest

from raypose.storage import retry as storage_retry
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxied(s3_bucket, monkeypatch):
    from raypose import storage

    endpoint, bucket = s3_bucket
    proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("RAYPOSE_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("RAYPOSE_S3_ATTEMPTS", "1")
    _, fs = storage_retry.ray_storage(storage.parse(f"s3://{bucket}/exp"))
    import s3fs

    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    yield proxy, fs, direct, bucket
    proxy.close()


def _restore_after(proxy, seconds):
    def run():
        time.sleep(seconds)
        proxy.set_mode("pass")

    threading.Thread(target=run, daemon=True).start()


def test_write_during_an_outage_lands_whole_once_the_store_is_back(proxied, monkeypatch, capsys):
    proxy, fs, direct, bucket = proxied
    monkeypatch.setenv("RAYPOSE_UPLOAD_RETRY_S", "60")
    payload = bytes(range(256)) * 4096  # 1 MiB, so that a cut upload would be visible
    proxy.set_mode("down")
    _restore_after(proxy, 4)
    start = time.monotonic()
    with fs.open_output_stream(f"{bucket}/exp/snapshot.json") as f:
        f.write(payload)
    took = time.monotonic() - start
    assert direct.cat(f"{bucket}/exp/snapshot.json") == payload
    assert took >= 3.5  # it waited for the store instead of writing somewhere else
    out = capsys.readouterr().out
    assert f"storage: writing {bucket}/exp/snapshot.json failed" in out and "retrying in" in out
    # reads and listings retry the same way
    proxy.set_mode("down")
    _restore_after(proxy, 3)
    with fs.open_input_stream(f"{bucket}/exp/snapshot.json") as f:
        assert f.read() == payload


def test_an_outage_longer_than_the_limit_fails_and_leaves_nothing(proxied, monkeypatch):
    proxy, fs, direct, bucket = proxied
    monkeypatch.setenv("RAYPOSE_UPLOAD_RETRY_S", "3")
    proxy.set_mode("down")
    start = time.monotonic()
    # the store's own connection error, whose type is botocore's
    with pytest.raises(Exception):  # noqa: B017
        with fs.open_output_stream(f"{bucket}/exp/never.json") as f:
            f.write(b"{}")
    assert time.monotonic() - start < 30  # bounded by the limit, plus one request's timeouts
    proxy.set_mode("pass")
    assert not direct.exists(f"{bucket}/exp/never.json")


def test_missing_object_is_not_retried(proxied, monkeypatch):
    import pyarrow.fs

    proxy, fs, direct, bucket = proxied
    monkeypatch.setenv("RAYPOSE_UPLOAD_RETRY_S", "60")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{bucket}/exp/absent.json")
    assert fs.get_file_info(f"{bucket}/exp/absent.json").type == pyarrow.fs.FileType.NotFound
    assert time.monotonic() - start < 5  # an answer from the store, not an outage


def test_listing_during_an_outage_waits_for_the_store(proxied, monkeypatch):
    import pyarrow.fs

    proxy, fs, direct, bucket = proxied
    monkeypatch.setenv("RAYPOSE_UPLOAD_RETRY_S", "60")
    direct.pipe(f"{bucket}/exp/a/x.json", b"1")
    proxy.set_mode("down")
    _restore_after(proxy, 3)
    # Ray checks a run's record with get_file_info before it loads it; during an outage the
    # answer must not be "not found", which would start the run over
    assert fs.get_file_info(f"{bucket}/exp/a/x.json").type == pyarrow.fs.FileType.File


def test_filesystems_of_one_store_are_equal_wherever_made(monkeypatch):
    """Ray Train accepts a checkpoint that a worker's upload function returns only on a filesystem
    equal to the run's storage filesystem, which the driver made and Ray pickled: equal by store
    and settings, not by the process or thread that made them; another endpoint is not equal."""
    import pickle
    import threading

    from raypose import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    loc = storage.parse("s3://bucket/exp")
    driver = storage_retry.ray_storage(loc)[1]
    made = []
    thread = threading.Thread(
        target=lambda: made.append(storage_retry.ray_storage(loc.join("x"))[1])
    )
    thread.start()
    thread.join()
    assert pickle.loads(pickle.dumps(driver)) == driver
    assert made[0] == pickle.loads(pickle.dumps(driver))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert storage_retry.ray_storage(loc)[1] != driver
