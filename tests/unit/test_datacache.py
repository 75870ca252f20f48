"""--data s3://...: the manifest, the node-local cache, its lock and its checks, against a real
moto S3 server over HTTP (through a byte-counting TCP proxy, tests/counting_proxy.py) and real
HDF5 files. No Ray here; tests/multinode/test_nodes.py and test_train_data_uri below run it on Ray."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import h5py
import pytest

from raypose.data import cache as datacache
from raypose.data.cache import DataCacheError, local_data_dir
from tests.counting_proxy import CountingProxy

REPO = Path(__file__).resolve().parents[2]
# A second run asks for manifest.json (about 400 bytes) plus S3's HTTP headers and nothing else;
# one byte of train.h5 (several MB) would be far above this.
NOTHING_DOWNLOADED = 32 * 1024


def sizes(folder, names=datacache.SPLIT_FILES):
    return sum((Path(folder) / n).stat().st_size for n in names)


@pytest.fixture
def data_uri(s3_bucket, tiny_data):
    """tiny_data's train.h5, test.h5 and manifest.json uploaded to s3://<bucket>/data."""
    import s3fs

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    for name in (*datacache.SPLIT_FILES, datacache.MANIFEST_FILE):
        fs.put_file(str(tiny_data / name), f"{bucket}/data/{name}")
    return f"s3://{bucket}/data"


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """Every s3fs request of this test (and of the processes it starts) goes through the proxy."""
    p = CountingProxy(urlparse(s3_server).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RAYPOSE_DATA_CACHE", str(folder))
    return folder


def test_synth_writes_a_manifest_of_size_sha256_and_schema(tiny_data):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["manifest_version"] == 1
    assert sorted(manifest["files"]) == ["test.h5", "train.h5"]
    for name, entry in manifest["files"].items():
        data = (tiny_data / name).read_bytes()
        assert entry == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "schema_version": 1,
        }


def test_write_manifest_lists_only_the_files_present(tmp_path, tiny_data):
    (tmp_path / "train.h5").write_bytes((tiny_data / "train.h5").read_bytes())
    datacache.write_manifest(tmp_path)
    assert list(json.loads((tmp_path / "manifest.json").read_text())["files"]) == ["train.h5"]
    with pytest.raises(DataCacheError, match="nothing to write a manifest for"):
        datacache.write_manifest(tmp_path / "empty")


def test_local_paths_pass_through():
    assert not datacache.is_uri("/data/synth") and not datacache.is_uri("file:///data/synth")
    assert datacache.is_uri("s3://bucket/data")
    assert local_data_dir("/data/synth") == Path("/data/synth")
    assert local_data_dir("file:///data/synth") == Path("/data/synth")
    assert datacache.absolute("s3://bucket/data/") == "s3://bucket/data"


def test_fetch_once_then_the_cache_downloads_nothing(data_uri, proxy, cache, tiny_data):
    folder = local_data_dir(data_uri)
    assert folder.parent == cache
    first = proxy.bytes_down
    for name in datacache.SPLIT_FILES:
        assert (folder / name).read_bytes() == (tiny_data / name).read_bytes()
    assert first >= sizes(tiny_data)  # both files came over HTTP
    h5py.File(folder / "train.h5", "r").close()
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in datacache.SPLIT_FILES}

    assert local_data_dir(data_uri) == folder  # a second run
    second = proxy.bytes_down - first
    assert second < NOTHING_DOWNLOADED, second
    assert {n: (folder / n).stat().st_mtime_ns for n in datacache.SPLIT_FILES} == mtimes
    print(f"bytes from the server: first run {first}, second run {second}")


def test_only_the_files_asked_for_are_fetched(data_uri, proxy, cache, tiny_data):
    folder = local_data_dir(data_uri, ("train.h5",))
    assert (folder / "train.h5").exists() and not (folder / "test.h5").exists()
    assert sizes(tiny_data, ["train.h5"]) <= proxy.bytes_down < sizes(tiny_data)


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_corrupted_cached_file_is_fetched_again(data_uri, proxy, cache, tiny_data, damage):
    folder = local_data_dir(data_uri, ("train.h5",))
    cached = folder / "train.h5"
    with open(cached, "r+b") as f:
        if damage == "truncated":
            f.truncate(cached.stat().st_size // 2)
        else:  # same size: only the hash can tell (the write changes the mtime, so it is re-hashed)
            f.seek(cached.stat().st_size // 2)
            f.write(b"\xff" * 4096)
    before = proxy.bytes_down
    local_data_dir(data_uri, ("train.h5",))
    assert proxy.bytes_down - before >= sizes(tiny_data, ["train.h5"])
    assert cached.read_bytes() == (tiny_data / "train.h5").read_bytes()


def test_a_new_manifest_replaces_the_cached_file(
    data_uri, proxy, cache, tmp_path, tiny_data, s3_bucket
):
    """New data uploaded under the same URI: the cached copy no longer matches and is replaced."""
    import s3fs

    folder = local_data_dir(data_uri, ("test.h5",))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_bucket[0]})
    other = tmp_path / "other"
    other.mkdir()
    (other / "test.h5").write_bytes((tiny_data / "train.h5").read_bytes())  # another valid file
    datacache.write_manifest(other)
    for name in ("test.h5", "manifest.json"):
        fs.put_file(str(other / name), f"{data_uri[5:]}/{name}")
    local_data_dir(data_uri, ("test.h5",))
    assert (folder / "test.h5").read_bytes() == (other / "test.h5").read_bytes()


FETCH = (
    "import sys; from raypose.data.cache import local_data_dir; "
    "print('folder', local_data_dir(sys.argv[1], ('train.h5',)), flush=True)"
)


def test_two_processes_on_one_node_share_one_download(data_uri, s3_server, cache, tiny_data):
    # slowed to about 3 MB/s, so the first download still runs when the second process asks
    proxy = CountingProxy(urlparse(s3_server).port, seconds_per_block=0.02)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": proxy.endpoint,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        first = subprocess.Popen(
            [sys.executable, "-c", FETCH, data_uri],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while proxy.bytes_down < 256 * 1024:  # the first process is downloading train.h5
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.01)
        second = subprocess.Popen(
            [sys.executable, "-c", FETCH, data_uri],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        outputs = [p.communicate(timeout=120)[0] for p in (first, second)]
        assert all(p.returncode == 0 for p in (first, second)), outputs
        # the first download was still running when the second process asked, yet the file
        # came over HTTP once
        size = sizes(tiny_data, ["train.h5"])
        assert size <= proxy.bytes_down < size + NOTHING_DOWNLOADED, proxy.bytes_down
        fetched = [line for out in outputs for line in out.splitlines() if "data: fetched" in line]
        assert len(fetched) == 1, outputs
        folders = {
            line.split(" ", 1)[1]
            for out in outputs
            for line in out.splitlines()
            if line.startswith("folder ")
        }
        assert len(folders) == 1
        assert (Path(folders.pop()) / "train.h5").read_bytes() == (
            tiny_data / "train.h5"
        ).read_bytes()
    finally:
        proxy.close()


def test_missing_manifest_is_one_line_naming_the_uri(s3_bucket, tiny_data, cache):
    import s3fs

    endpoint, bucket = s3_bucket
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).put_file(
        str(tiny_data / "train.h5"), f"{bucket}/nomanifest/train.h5"
    )
    with pytest.raises(DataCacheError) as e:
        local_data_dir(f"s3://{bucket}/nomanifest")
    message = str(e.value)
    assert f"s3://{bucket}/nomanifest/manifest.json" in message and "\n" not in message
    assert not any(cache.rglob("*.h5"))  # nothing was fetched


def test_missing_or_mismatching_files_are_one_line_naming_the_uri(
    data_uri, s3_bucket, cache, tmp_path
):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_bucket[0]})
    root = data_uri[len("s3://") :]
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    fs.rm(f"{root}/test.h5")
    with pytest.raises(
        DataCacheError, match=f"{data_uri}/test.h5 is listed in manifest.json but does not exist"
    ):
        local_data_dir(data_uri, ("test.h5",))
    del manifest["files"]["test.h5"]
    manifest["files"]["train.h5"]["sha256"] = "0" * 64
    fs.pipe(f"{root}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(DataCacheError, match="manifest.json lists no test.h5"):
        local_data_dir(data_uri, ("test.h5",))
    with pytest.raises(DataCacheError) as e:
        local_data_dir(data_uri, ("train.h5",))
    assert f"{data_uri}/train.h5 does not match manifest.json" in str(e.value)
    assert "\n" not in str(e.value) and os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
    assert not any(cache.rglob("*.h5")) and not any(cache.rglob("*.part"))  # nothing half-kept


def test_unreachable_endpoint_is_one_line(monkeypatch, cache):
    from tests.support import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(DataCacheError) as e:
        local_data_dir("s3://bucket/data")
    assert "s3://bucket/data/manifest.json" in str(e.value) and "\n" not in str(e.value)
