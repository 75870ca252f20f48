"""Helpers the tests share (fixtures live in conftest.py): a multi-node Ray cluster on this
machine, a free loopback port, polling with a deadline, and a config sized for tests."""

import contextlib
import socket
import time


@contextlib.contextmanager
def ray_cluster(head_args: dict, node_args=(), **init_kwargs):
    """A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster) with this
    process as its driver: a head started with head_args and one node per entry of node_args.
    Yields (cluster, added nodes); always shut down, never `ray stop`."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        added = [cluster.add_node(**args) for args in node_args]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, **init_kwargs)
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    """A free loopback port outside Ray's worker port range (a server there would collide with
    a Ray worker started later)."""
    from raypose.cluster.dev import RAY_WORKER_PORTS

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[1]:
            return port


def wait_until(condition, timeout, what):
    """condition()'s first true value, polled every 0.2 s; AssertionError after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tiny_config(data_dir, storage_uri, name="run", **sets):
    """A Config sized for tests: small batches, two CPU workers, quick epochs."""
    from raypose.config import Config, set_value

    cfg = Config()
    cfg.data.path = str(data_dir)
    cfg.data.batch_size = 8
    cfg.storage.uri = str(storage_uri)
    cfg.storage.name = name
    cfg.scaling.workers = 2
    cfg.schedule.epochs = 2
    for key, value in sets.items():
        set_value(cfg, key.replace("__", "."), value, "test")
    return cfg.validate()
