"""Whether the Ray cluster holds the workers a run asks for, before any worker starts: refused at
once on a Ray instance that raypose started itself, waited for (up to scaling.autoscaler_wait_s)
on a cluster, where an autoscaler may add nodes.

Only Ray's public API is used (`ray.nodes()`, `ray.cluster_resources()`,
`ray.autoscaler.sdk.request_resources`, `ray.util.placement_group`,
`ray.util.client.ray.is_connected()`), so the same code works for a driver connected by GCS
address and for a Ray Client driver (`ray://`), which has no GCS connection of its own.  Where
Ray plugs in is marked `# Ray:`.  Nothing here runs on a worker of the run.
"""

import contextlib
import dataclasses
import math
import re
import time

from raypose.config import Config, ConfigError

# How long one call that asks the autoscaler, run as a task on the cluster, may take
REQUEST_TIMEOUT_S = 120
POLL_INTERVAL_S = 1.0


class ClusterWaitError(RuntimeError):
    """The workers a run asked for were not up within scaling.autoscaler_wait_s."""


def worker_bundle(cfg: Config) -> dict:
    """What one Ray Train worker asks for: its CPUs and, with a GPU, scaling.gpu_share of one
    (1, or 1/k so that k workers share it)."""
    bundle = {"CPU": float(cfg.scaling.cpus_per_worker)}
    if cfg.scaling.gpu:
        bundle["GPU"] = float(cfg.scaling.gpu_share)
    return bundle


# Ray counts resources in units of 0.0001 (ray_constants.MIN_RESOURCE_GRANULARITY)
RESOURCE_UNITS = 10_000


def fits(node: dict, bundle: dict) -> int:
    """How many bundles fit on a node with these total resources. Counted in Ray's own units,
    so that 1 GPU holds exactly 8 shares of 0.125 (and 3 of 0.3333), as Ray places them."""
    counts = [
        round(node.get(k, 0) * RESOURCE_UNITS) // round(v * RESOURCE_UNITS)
        for k, v in bundle.items()
        if v > 0
    ]
    return min(counts) if counts else 0


# what each placement group adds to the cluster's resources while it exists (CPU_group_<id>,
# CPU_group_0_<id>, bundle_group_<id>, ...): reserved, not more
_PLACEMENT_GROUP = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")


def brief(resources: dict) -> str:
    """`{CPU: 2, GPU: 1}`: the resources a person asks for, without memory and Ray's own labels."""
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k
        for k in resources
        if k not in ("CPU", "GPU", "memory", "object_store_memory")
        and not k.startswith(("node:", "accelerator_type:"))
        and not _PLACEMENT_GROUP.search(k)
    )
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}"


@dataclasses.dataclass
class Capacity:
    """Ray Train workers of one bundle that the cluster holds now and can ever hold.

    most: None on a cluster, where an autoscaler may add nodes of types that Ray's public API
    does not describe; `now` on an instance raypose started itself, which nothing grows."""

    now: int
    most: int | None
    offer: str  # what the cluster holds, for messages


def _alive_nodes() -> list:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]  # Ray: answered through Ray Client too


def _workers_up(bundle: dict) -> int:
    return sum(fits(n["Resources"], bundle) for n in _alive_nodes())


def cluster_capacity(bundle: dict, local: bool = False) -> Capacity:
    """Workers of `bundle` on the nodes that are up now. local: raypose started this Ray instance
    itself (ray.init() without an address), so what is up is all there will be.

    ray.cluster_resources() counts only nodes that are up: an autoscaling cluster whose GPU nodes
    start at zero shows no GPU at all, and its node types are not part of Ray's public API, so
    on a cluster the most it can hold stays unknown."""
    import ray

    nodes = _alive_nodes()
    now = sum(fits(n["Resources"], bundle) for n in nodes)
    held = brief(ray.cluster_resources())  # Ray: the totals of the nodes that are up
    if local:
        return Capacity(
            now,
            now,
            f"the local Ray instance that raypose started holds {held}; "
            "no autoscaler: that is all there is",
        )
    return Capacity(now, None, f"nodes up: {len(nodes)} with {held}")


def _request_resources(bundles: list) -> None:
    """Asks the autoscaler to make room for `bundles`, replacing any earlier request of this
    driver's job; [] withdraws it."""
    import ray

    from raypose.cluster.ray_internals import (
        request_resources,
    )  # a standing request to the autoscaler

    # request_resources of Ray 2.55 and earlier takes only int amounts (2.60 takes floats too);
    # a GPU share asks for the whole GPU it sits on, which is what a new node brings anyway
    bundles = [{k: math.ceil(v) for k, v in b.items()} for b in bundles]
    if not ray.util.client.ray.is_connected():
        request_resources(bundles=bundles)
        return

    # Under Ray Client request_resources fails here: it reads the autoscaler's version through
    # the GCS client that only a process on the cluster has. A task there asks instead (Ray
    # Client runs need raypose on the cluster anyway).
    def ask(bundles):
        from raypose.cluster.ray_internals import request_resources

        request_resources(bundles=bundles)

    ray.get(ray.remote(num_cpus=0, max_retries=0)(ask).remote(bundles), timeout=REQUEST_TIMEOUT_S)


def _request_breaks_the_autoscaler() -> bool:
    """Whether request_resources(bundles=...) would stop the autoscaler instead of growing the
    cluster: before Ray 2.54 it writes its request in a form that the classic (v1) autoscaler
    cannot read, and that autoscaler's every update then fails with `TypeError: unhashable type:
    'dict'` until the request is withdrawn (ray-project/ray#59677, fixed by #59850)."""
    import ray

    release = tuple(int(p) for p in re.findall(r"\d+", ray.__version__)[:2])
    return release < (2, 54)


@contextlib.contextmanager
def _asking_for(bundles: list):
    """The autoscaler is asked for room for `bundles` while the block runs, and no longer after."""
    if not _request_breaks_the_autoscaler():
        _request_resources(bundles)
        try:
            yield
        finally:
            _request_resources([])
        return
    # A placement group that waits for its bundles is a demand that every autoscaler of these
    # releases serves; once the nodes are up it holds their resources until it is removed
    from ray.util.placement_group import placement_group, remove_placement_group  # Ray

    group = placement_group(bundles, strategy="PACK")
    try:
        yield
    finally:
        remove_placement_group(group)


def check_resources(
    cfg: Config, flags: str, what: str = "the run", local: bool = False
) -> Capacity:
    """Before any worker starts, and before anything is written to storage: are the run's
    workers (the minimum of an elastic group) up? flags: the flags that asked, for the messages;
    local: raypose started this Ray instance itself, without an address.

    On a local instance nothing adds nodes, so a request that does not fit is refused at once
    (ConfigError). On a cluster an autoscaler may add them: raypose asks it for the workers'
    bundles (ray.autoscaler.sdk.request_resources; a placement group before Ray 2.54, see
    _request_breaks_the_autoscaler), waits up to scaling.autoscaler_wait_s for them to be up,
    and else raises ClusterWaitError; the request is withdrawn either way, since Ray Train's
    placement group keeps asking for what the run uses, and a standing request would keep nodes
    up after the run.

    raypose cannot tell apart, through Ray's public API, a node that is still starting from a
    node type that does not exist: that is what the bounded wait is for. Ray Train itself refuses
    at once a worker group that can never fit the cluster config an autoscaler reports to the
    GCS: WorkerGroup._check_cluster_resources_and_raise_if_insufficient in
    ray/train/v2/_internal/execution/worker_group/worker_group.py raises
    InsufficientClusterResourcesError before it waits for its placement group. It runs in Ray
    Train's controller on the cluster, so under Ray Client too; where no such config is reported,
    it waits like raypose does."""
    bundle = worker_bundle(cfg)
    need, _ = cfg.worker_range()
    capacity = cluster_capacity(bundle, local=local)
    if capacity.now >= need:
        return capacity
    asked = f"{need} worker(s) of {brief(bundle)} for {what}"
    if local:
        raise ConfigError(
            f"{flags}: {asked}, but the Ray cluster can never offer that (at most "
            f"{capacity.now} such worker(s); {capacity.offer})"
        )
    wait = cfg.scaling.autoscaler_wait_s
    print(
        f"[raypose] waiting up to {wait:g} s for the autoscaler to add nodes: {asked}; "
        f"{capacity.offer}",
        flush=True,
    )
    deadline = time.monotonic() + wait
    with _asking_for([bundle] * need):
        while True:
            now = _workers_up(bundle)
            if now >= need:
                print(f"[raypose] the cluster now holds {now} such worker(s)", flush=True)
                return Capacity(now, None, cluster_capacity(bundle).offer)
            if time.monotonic() >= deadline:
                held = cluster_capacity(bundle).offer
                raise ClusterWaitError(
                    f"{flags}: gave up after {wait:g} s waiting for the autoscaler: {asked}, and "
                    f"the cluster holds {now} such worker(s) ({held}); if no node type of the "
                    "cluster offers that, no wait is long enough (`ray status` shows the "
                    "autoscaler's pending and infeasible requests); scaling.autoscaler_wait_s "
                    "sets the wait"
                )
            time.sleep(POLL_INTERVAL_S)
