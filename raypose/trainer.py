"""Ray Train V2's data-parallel trainer, less the processes per run that raypose does not need,
and the sweep's own cleanup of the placement groups that ended runs leave reserved.

Train V2 adds a `DatasetsCallback` to every run, and that callback starts a `DatasetManager`
actor (ray/train/v2/_internal/callbacks/datasets.py), a new Python process that imports Ray Data,
even when the run has no Ray Datasets. raypose reads its HDF5 files in the workers and passes no
datasets, so the actor only costs CPU while the run starts: on this 2-core machine, with another
process holding one core (a sweep's other trial), a 1-worker run's start-up to its first training
step had a median of 10.9 s with the actor and 9.3 s without, over 5 alternating pairs, each pair
faster without it (README, *Speed*). The workers then get no dataset shard provider, which Train
V2's worker accepts (`dataset_shard_provider=None`); `ray.train.get_dataset_shard` would raise,
and raypose does not call it.

Train V2 also starts a `PlacementGroupCleaner` for every run (a detached actor, another new
process that imports Ray Train), which removes the run's placement group if the run's controller
dies without doing so, and which the controller waits for before the run's workers start. Ray
keeps a placement group until the job ends when the actor that created it dies, so a trial that
ASHA stops (Tune ends the trial's process, and with it the run's controller) would keep its CPUs
and GPUs reserved for the rest of the sweep. A sweep's driver removes those groups itself
(`OrphanedPlacementGroups`, one GCS query a second in a thread), and its trials' trainers leave
Ray's cleaner out (`ray_placement_group_cleaner=False`). With one core busy, a 1-worker run's
start-up fell from a median of 7.3 s to 6.2 s over 4 rounds in alternating order (README,
*Start-up of a run*). Single runs (`raypose train`) keep Ray's cleaner.

`_create_default_callbacks` is Train V2's own hook for the callbacks of a run (private in Ray
2.60). If a Ray version renames a callback class, its import below fails and that callback stays.

This module must not import torch (tests/test_backend.py checks it in a fresh process).
"""

import logging
import pickle
import threading
import time

from ray.train.v2.api.callback import UserCallback  # Ray: runs in Ray Train's controller
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # Ray: Train V2's trainer

try:  # Ray: private in 2.60
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # pragma: no cover - another Ray version: keep Ray's callbacks as they are
    DatasetsCallback = None
try:  # Ray: private in 2.60
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback)
except ImportError:  # pragma: no cover - another Ray version: keep Ray's cleaner
    PlacementGroupCleanerCallback = None

logger = logging.getLogger(__name__)


class Trainer(DataParallelTrainer):
    """DataParallelTrainer without the Ray Data actor when the run has no datasets, and without
    Ray's placement-group cleaner when ray_placement_group_cleaner=False (the caller then frees
    the run's placement group if the run's controller dies: OrphanedPlacementGroups)."""

    def __init__(self, *args, ray_placement_group_cleaner: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray_placement_group_cleaner = ray_placement_group_cleaner

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        left_out = []
        if not self.datasets and DatasetsCallback is not None:
            left_out.append(DatasetsCallback)
        if not self.ray_placement_group_cleaner and PlacementGroupCleanerCallback is not None:
            left_out.append(PlacementGroupCleanerCallback)
        return [c for c in callbacks if not isinstance(c, tuple(left_out))]


def actor_placement_groups() -> list:
    """This job's placement groups (not yet removed, not detached) that an actor created, as
    (PlacementGroupID, whether that actor has died). Groups that the job's driver created
    (Tune's own, one per trial) have no creating actor and are never listed."""
    import ray
    from ray._private.state import state  # Ray: private in 2.60
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    # the GCS's own table: ray.util.placement_group_table() leaves out the creator's fields
    job = ray.get_runtime_context().get_job_id()
    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = PlacementGroupTableData.FromString(raw)
        if (pg.state != PlacementGroupTableData.REMOVED and not pg.is_detached
                and pg.creator_job_id.hex() == job
                and not ray.ActorID(pg.creator_actor_id).is_nil()):
            found.append((ray.PlacementGroupID(pg.placement_group_id), pg.creator_actor_dead))
    return found


def orphaned_placement_groups() -> list:
    """This job's placement groups whose creating actor has died. Ray keeps such a group, and the
    CPUs and GPUs it reserves, until the job ends. In a sweep they are the groups of Ray Train
    runs whose controller died with the trial's process."""
    return [pg_id for pg_id, dead in actor_placement_groups() if dead]


def remove_orphaned_placement_groups() -> int:
    """Removes orphaned_placement_groups(); returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    found = orphaned_placement_groups()
    for pg_id in found:
        remove_placement_group(PlacementGroup(pg_id))
        logger.info("removed placement group %s: the actor that created it has died", pg_id.hex())
    return len(found)


class OrphanedPlacementGroups:
    """While in this context, a thread of the job's driver removes the job's orphaned placement
    groups every interval_s seconds (a trial's slot is free again within about that time after
    Tune ends the trial's process). Not for Ray Client drivers (no GCS connection here)."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.removed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raypose-placement-groups",
                                        daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.removed += remove_orphaned_placement_groups()
            except Exception:  # the GCS briefly unreachable: try again at the next interval
                logger.warning("looking for orphaned placement groups failed", exc_info=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        # Tune ends the trials' processes as the sweep ends: wait (up to 5 s) until every Train
        # run's group is gone, removing the orphans among them, so that none outlives the sweep
        # in a job that goes on (a test, a notebook)
        deadline = time.monotonic() + 5.0
        try:
            while True:
                self.removed += remove_orphaned_placement_groups()
                if not actor_placement_groups() or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except Exception:  # the sweep's result matters more than this last pass
            logger.warning("looking for orphaned placement groups failed", exc_info=True)
        return False


# ----------------------------------------------------------------------------------------------
# A Tune trial's reports, from the run's controller to the trial's process

RELAY_NAMESPACE = "raypose"
RELAY_POLL_S = 0.2  # how often the trial's process looks for the next report (one GCS read)


class ReportRelay(UserCallback):
    """Hands each report of a Ray Train run (rank 0's metrics, and "checkpoint_path" when the
    report carried a checkpoint) to the Tune trial that runs it: fit_relaying_reports reads them.

    Ray's own `TuneReportCallback` does the same through a `ray.util.queue.Queue`, an actor: one
    more Python process per trial, which imports Ray while the run's controller and worker start
    on the same cores (2.3-2.7 s of CPU per trial in the default demo). This one writes each report
    under its own key to the GCS's key-value store (Ray's internal one, which Tune's registry
    also uses), read once by the trial's process and then deleted; no process of its own."""

    def __init__(self, key: str):
        self.key = key
        self.count = 0

    def after_report(self, run_context, metrics, checkpoint):
        from ray.experimental.internal_kv import _internal_kv_put  # Ray: private in 2.60

        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path  # already in storage: the path, not a copy
        self.count += 1
        _internal_kv_put(_relay_key(self.key, self.count), pickle.dumps(item),
                         namespace=RELAY_NAMESPACE)


def _relay_key(key: str, n: int) -> bytes:
    return f"{key}/{n:09d}".encode()


def fit_relaying_reports(trainer, key: str, report, poll_s: float = RELAY_POLL_S):
    """Runs trainer.fit() (its callbacks include ReportRelay(key)) in a thread and calls
    report(metrics) for each of its reports, in order, from the calling thread (a Tune function's:
    ray.tune.report). Returns fit's result; fit's error is raised here, after the reports that
    came before it."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get  # Ray: private

    outcome = {}
    done = threading.Event()

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # raised below, in the trial's own thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="raypose-fit", daemon=True).start()
    n = 0
    try:
        while True:
            finished = done.wait(poll_s)  # every report is in the store before fit returns
            while (raw := _internal_kv_get(_relay_key(key, n + 1),
                                           namespace=RELAY_NAMESPACE)) is not None:
                n += 1
                _internal_kv_del(_relay_key(key, n), namespace=RELAY_NAMESPACE)
                report(pickle.loads(raw))
            if finished:
                break
    finally:
        _internal_kv_del(f"{key}/".encode(), del_by_prefix=True, namespace=RELAY_NAMESPACE)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
