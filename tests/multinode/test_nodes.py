"""Per-node checks (raypose.cluster.nodes) on a real 2-node Ray cluster (ray.cluster_utils.Cluster, 1 CPU
per node), with real files and a real moto S3 server over HTTP.

Both nodes run on this machine and share its file system and network, so a node that cannot see
the data, or sees another storage folder, or another endpoint, has to be made. The second node is
started with its own environment, the way a misconfigured machine of a real cluster differs:
- AWS_ENDPOINT_URL_S3 pointing at a closed port on 127.0.0.1. It takes precedence over the
  AWS_ENDPOINT_URL that the driver forwards, so s3fs on that node really tries the closed port,
  unless the driver forwards AWS_ENDPOINT_URL_S3 itself (the happy path does);
- RAYPOSE_NODE_CHECK_HIDE_PATHS naming one folder, which the node check on that node treats as
  absent (a folder the node does not mount). Paths outside it are checked for real there.
The head node has neither, so every failure below must name the second node and never the head.
"""

import shutil
import time

import pytest

from raypose import storage
from raypose.cluster import nodes
from tests.support import free_port, ray_cluster, tiny_config


@pytest.fixture(scope="module")
def hidden_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hidden_on_second_node")


@pytest.fixture(scope="module")
def cluster(hidden_root):
    """(cluster, head node id, second node id); shut down after the module."""
    closed_port = free_port()  # nothing listens there
    second_args = {
        "num_cpus": 1,
        "env_vars": {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{closed_port}",
            nodes.HIDE_PATHS_ENV: str(hidden_root),
        },
    }
    with ray_cluster({"num_cpus": 1}, [second_args]) as (c, (second,)):
        yield c, c.head_node.node_id, second.node_id, closed_port


def short(node_id: str) -> str:
    return node_id[:8]


def check_fails(cfg, loc):
    with pytest.raises(nodes.NodeCheckError) as e:
        nodes.check_nodes(cfg, loc, timeout_s=120)
    print(e.value)  # the line a user sees (pytest -s shows it)
    return str(e.value)


def test_happy_path_checks_both_nodes(cluster, tiny_data, s3_bucket, tmp_path, monkeypatch):
    _, head, second, _ = cluster
    endpoint, bucket = s3_bucket
    # the driver forwards its endpoint under the name the second node set, so both nodes use it
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    cfg = tiny_config(tiny_data, f"s3://{bucket}/runs", workers=1)
    names = nodes.check_nodes(cfg, storage.parse(cfg.storage.uri), timeout_s=120)
    assert sorted(n.split()[1] for n in names) == sorted([short(head), short(second)])
    # local storage on two nodes: the marker the driver wrote reads back on both; none is left
    local = storage.parse(str(tmp_path / "runs"))
    storage.check_reachable(local)
    assert len(nodes.check_nodes(cfg, local, timeout_s=120)) == 2
    assert list((tmp_path / "runs" / nodes.MARKER_DIR).iterdir()) == []


def test_data_missing_on_a_node(cluster, tiny_data, hidden_root, tmp_path):
    _, head, second, _ = cluster
    data = hidden_root / "data"
    data.mkdir(exist_ok=True)
    for name in ("train.h5", "test.h5"):
        shutil.copy(tiny_data / name, data / name)
    local = storage.parse(str(tmp_path / "runs"))
    storage.check_reachable(local)
    cfg = tiny_config(data, local.uri, workers=1)
    message = check_fails(cfg, local)
    assert "\n" not in message
    assert (
        f"node {short(second)} (" in message
        and f"--data {data}: train.h5 and test.h5 not found" in message
    )
    assert short(head) not in message  # the head sees the folder


def test_local_storage_not_shared_on_a_multi_node_cluster(cluster, tiny_data, hidden_root):
    _, head, second, _ = cluster
    local = storage.parse(str(hidden_root / "runs"))
    storage.check_reachable(local)  # the driver's own check passes: the folder is there for it
    cfg = tiny_config(tiny_data, local.uri, workers=1)
    message = check_fails(cfg, local)
    assert "\n" not in message and short(head) not in message
    assert f"node {short(second)} (" in message
    assert f"--storage {local.path} is not the driver's folder here" in message
    assert f"{local.path}/{nodes.MARKER_DIR}/" in message and "missing" in message
    assert list((hidden_root / "runs" / nodes.MARKER_DIR).iterdir()) == []  # marker removed


def test_unreachable_storage_endpoint_seen_from_a_node(cluster, tiny_data, s3_bucket):
    _, head, second, closed_port = cluster
    _, bucket = s3_bucket  # the driver reaches it at AWS_ENDPOINT_URL, the second node cannot
    loc = storage.parse(f"s3://{bucket}/runs")
    storage.check_reachable(loc)
    cfg = tiny_config(tiny_data, loc.uri, workers=1)
    message = check_fails(cfg, loc)
    assert "\n" not in message and short(head) not in message
    assert f"node {short(second)} (" in message
    assert (
        f"storage s3://{bucket}/runs: the endpoint http://127.0.0.1:{closed_port} is unreachable"
        in message
    )
    assert "testing" not in message  # the (dummy) credentials never show


def test_a_node_that_does_not_answer_in_time(cluster, tiny_data, tmp_path, monkeypatch):
    """An endpoint that accepts connections and never answers (s3fs waits 60 s per read there):
    every node's check is still pending at the timeout, is cancelled, and is named."""
    import socket

    _, head, second, _ = cluster
    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port()))
    silent.listen(16)  # the kernel accepts; nobody ever reads or answers
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        cfg = tiny_config(tiny_data, "s3://bucket/runs", workers=1)
        start = time.monotonic()
        with pytest.raises(nodes.NodeCheckError) as e:
            nodes.check_nodes(cfg, storage.parse(cfg.storage.uri), timeout_s=5)
        # 5 s of waiting plus starting the tasks' workers; far below s3fs's own 60 s read timeout
        assert time.monotonic() - start < 45
    finally:
        silent.close()
    message = str(e.value)
    print(message)
    assert "\n" not in message
    for node in (head, second):
        assert f"node {short(node)} (" in message
    assert message.count("no answer within 5 s") == 2
