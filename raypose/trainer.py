"""Ray Train V2's data-parallel trainer, less one process per run that raypose never uses.

Train V2 adds a `DatasetsCallback` to every run, and that callback starts a `DatasetManager`
actor (ray/train/v2/_internal/callbacks/datasets.py), a new Python process that imports Ray Data,
even when the run has no Ray Datasets. raypose reads its HDF5 files in the workers and passes no
datasets, so the actor only costs CPU while the run starts: on this 2-core machine, with another
process holding one core (a sweep's other trial), a 1-worker run's start-up to its first training
step had a median of 10.9 s with the actor and 9.3 s without, over 5 alternating pairs, each pair
faster without it (README, *Speed*). The workers then get no dataset shard provider, which Train
V2's worker accepts (`dataset_shard_provider=None`); `ray.train.get_dataset_shard` would raise,
and raypose does not call it.

`_create_default_callbacks` is Train V2's own hook for the callbacks of a run (private in Ray
2.60). If a Ray version renames the callback class, the import below fails and the trainer is
Ray's, unchanged.

This module must not import torch (tests/test_backend.py checks it in a fresh process).
"""

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # Ray: Train V2's trainer

try:  # Ray: private in 2.60
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # pragma: no cover - another Ray version: keep Ray's callbacks as they are
    DatasetsCallback = None


class Trainer(DataParallelTrainer):
    """DataParallelTrainer without the Ray Data actor when the run has no datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
