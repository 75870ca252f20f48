"""Checks on every node before training: can each node that will host a worker read the data and
reach the storage?  The driver's own checks (raypose.cluster.driver.preflight) only see the driver's machine;
on a cluster a worker node may lack the shared volume, sit behind another network, or see a local
--storage path that is a different folder from the driver's.

check_nodes runs one tiny Ray task on every alive node that can host a worker (pinned with
NodeAffinitySchedulingStrategy, soft=False; it asks for no CPU, so it never waits behind running
work), with the environment the workers get (raypose.cluster.driver.forwarded_env). Each task confirms:

- a local --data folder: train.h5 and test.h5 (those of the two that the driver sees) exist and
  open as HDF5; for s3://..., the node can read the data's manifest.json;
- the storage is reachable from the node (storage.check_reachable, creating nothing);
- a local --storage path on a cluster of more than one node: a marker file that the driver wrote
  under the storage folder, holding a random token, reads back with the same token. A path that
  exists on every node but is a separate disk on each fails here.

Every failure is gathered into one NodeCheckError line naming each node (short node id and IP)
and the path or endpoint; a node that does not answer within the timeout counts as a failure.
"""

import os
import secrets
import time

from raypose import storage
from raypose.data import cache as datacache

MARKER_DIR = ".raypose-node-check"
DEFAULT_TIMEOUT_S = 60.0
# For tests on one machine, where every node shares one file system: paths (os.pathsep-separated
# prefixes) that the check on a node started with this variable treats as absent. Only the node
# check reads it; training itself never does.
HIDE_PATHS_ENV = "RAYPOSE_NODE_CHECK_HIDE_PATHS"


class NodeCheckError(RuntimeError):
    """A node that will host workers cannot read the data or reach the storage; the message names
    the node and the path or endpoint."""


def _hidden(path: str) -> bool:
    prefixes = [p for p in os.environ.get(HIDE_PATHS_ENV, "").split(os.pathsep) if p]
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def check_this_node(
    data: str, split_files: list, storage_uri: str, marker: str | None, token: str | None
) -> list:
    """Runs on one node: the problems it sees (empty when none), each naming the path or URI.
    split_files: the split files of a local data folder that the driver sees there."""
    problems = []
    if datacache.is_uri(data):
        try:
            datacache.read_manifest(storage.parse(data))
        except datacache.DataCacheError as e:
            problems.append(str(e))
    else:
        import h5py

        missing = [
            n
            for n in split_files
            if _hidden(os.path.join(data, n)) or not os.path.isfile(os.path.join(data, n))
        ]
        if missing:
            problems.append(f"--data {data}: {' and '.join(missing)} not found")
        for name in (n for n in split_files if n not in missing):
            path = os.path.join(data, name)
            try:
                with h5py.File(path, "r"):
                    pass
            except OSError as e:
                problems.append(f"--data {path} does not open as HDF5 ({e})")
    loc = storage.parse(storage_uri)
    if marker is not None:  # a local storage path on a cluster of several nodes
        try:
            if _hidden(marker):
                raise FileNotFoundError(marker)
            with open(marker) as f:
                seen = f.read().strip()
        except OSError:
            seen = None
        if seen != token:
            problems.append(
                f"--storage {loc.path} is not the driver's folder here (the marker "
                f"{marker} that the driver wrote is {'missing' if seen is None else 'another'}); "
                "use a volume every node mounts at this path, or s3://"
            )
    else:
        try:
            storage.check_reachable(loc, create=False)
        except storage.StorageError as e:
            problems.append(str(e))
    return problems


def worker_nodes(cfg) -> list:
    """Alive nodes whose resources can host one training worker: its CPUs, and with a GPU the
    worker's request (scaling.gpu_share: a whole GPU or a share of one)."""
    import ray

    gpu = {"GPU": cfg.scaling.gpu_share} if cfg.scaling.gpu else {}
    needed = {"CPU": cfg.scaling.cpus_per_worker, **gpu}
    return [
        n
        for n in ray.nodes()
        if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in needed.items())
    ]


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node['NodeManagerAddress']})"


def check_nodes(
    cfg, storage_location: storage.Location, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list:
    """Checks every node that can host a worker; returns their names, or raises one NodeCheckError
    line naming each failing node. Needs a connected Ray (after raypose.cluster.driver.init_ray)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypose.cluster.driver import forwarded_env

    nodes = worker_nodes(cfg)
    if not nodes:  # an autoscaling cluster whose worker nodes are not up yet
        print(
            "[raypose] node check: no node that can host a worker is up yet; nodes that join "
            "later are not checked",
            flush=True,
        )
        return []
    alive = [n for n in ray.nodes() if n["Alive"]]
    marker = token = None
    if storage_location.scheme == "file" and len(alive) > 1:
        token = secrets.token_hex(16)
        marker_dir = os.path.join(storage_location.path, MARKER_DIR)
        os.makedirs(marker_dir, exist_ok=True)
        marker = os.path.join(marker_dir, f"{token}.txt")
        with open(marker, "w") as f:
            f.write(token)
    # Ray: one task per node, pinned there; it asks for no CPU so that it never queues behind work
    split_files = (
        []
        if datacache.is_uri(cfg.data.path)
        else [n for n in datacache.SPLIT_FILES if os.path.isfile(os.path.join(cfg.data.path, n))]
    )
    check = ray.remote(num_cpus=0, max_retries=0)(check_this_node)
    refs = {
        check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            runtime_env={"env_vars": forwarded_env()},
        ).remote(cfg.data.path, split_files, storage_location.uri, marker, token): n
        for n in nodes
    }
    start = time.perf_counter()
    try:
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        failures = []
        for ref in refs:
            name = _node_name(refs[ref])
            if ref in pending:
                ray.cancel(ref, force=True)
                failures.append(f"{name}: no answer within {timeout_s:.0f} s")
                continue
            try:
                problems = ray.get(ref)
            except Exception as e:  # the task itself failed (node lost, import error)
                problems = [f"the check task failed ({type(e).__name__})"]
            failures += [f"{name}: {p}" for p in problems]
    finally:
        if marker is not None:
            os.unlink(marker)
    if failures:
        raise NodeCheckError("node check failed: " + "; ".join(failures))
    names = [_node_name(n) for n in nodes]
    shared = " and the same storage folder" if marker else ""
    print(
        f"[raypose] node check: {len(nodes)} node(s) read --data {cfg.data.path} and reach "
        f"--storage {storage_location.uri}{shared} ({', '.join(names)}; "
        f"{time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return names
