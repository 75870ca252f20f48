"""raypose.backend: Ray Train's controller and a sweep trial's driver load raypose's trainer without
importing torch (each such import cost a trial seconds of start-up before its first step). The
process groups it sets up are exercised by the multi-worker runs in test_train_ray.py and
test_cluster_ray.py."""

import subprocess
import sys

from ray import cloudpickle  # what Ray pickles with

from raypose.backend import TorchBackendConfig
from raypose.train import train_func_per_worker


def _run(code: str, stdin: bytes = b"") -> str:
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          timeout=120, check=True)
    return done.stdout.decode().strip()


def test_driver_modules_do_not_import_torch():
    # what a sweep trial's driver imports (raypose.tune.train_driver_fn -> raypose.train)
    out = _run("import sys, raypose.tune, raypose.train, raypose.backend, raypose.trainer, raypose.cli\n"
               "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    assert out == "[]"


def test_controller_unpickles_trainer_parts_without_torch():
    # Ray Train's controller receives the training function and the backend config pickled (the
    # function by reference to raypose.train); loading them must not pull torch in
    blob = cloudpickle.dumps((train_func_per_worker, TorchBackendConfig()))
    out = _run("import sys, pickle\n"
               "fn, config = pickle.loads(sys.stdin.buffer.read())\n"
               "backend = config.backend_cls()\n"
               "print(fn.__module__, type(backend).__name__, config.framework.name, "
               "'torch' in sys.modules)", stdin=blob)
    assert out == "raypose.train _TorchBackend TORCH False"


def test_config_matches_ray_torch_config_fields():
    # the same defaults as ray.train.torch.TorchConfig, whose place it takes
    from ray.train.torch import TorchConfig

    ours, rays = TorchBackendConfig(), TorchConfig()
    assert (ours.backend, ours.timeout_s) == (rays.backend, rays.timeout_s)
    assert ours.to_dict() == rays.to_dict()


def test_local_instance_runs_workers_at_niceness_0(tmp_path):
    # Ray's default runs worker processes at niceness 15, below its daemons; raypose's local
    # instance runs them at 0 (they are the training). A fresh process keeps this test's
    # environment (and any earlier Ray instance of the pytest process) out of it. The Train V2
    # preemption watcher, which the local instance turns off (next test), stays on when the user
    # says so.
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness" and k != "RAY_ADDRESS"}
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
    code = ("import os, ray\n"
            "from raypose.driver import init_ray\n"
            "init_ray(num_cpus=1, command='test')\n"
            "try:\n"
            "    print(*ray.get(ray.remote(lambda: (os.nice(0), os.environ.get(\n"
            "        'RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'))).remote()))\n"
            "finally:\n"
            "    ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=180, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip().splitlines()[-1].split() == ["0", "1"]


def test_local_instance_runs_without_preemption_watcher(tmp_path):
    # Train V2 gives every run a PreemptionWatcher actor (one more process per run) unless
    # RAY_TRAIN_ENABLE_PREEMPTION_WATCHER is off; raypose's own one-node instance turns it off
    # (a value the user set is kept: the test above). A real run of raypose's trainer on a fresh instance,
    # whose actors are then listed: the controller and the worker, no watcher.
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    code = ("import ray\n"
            "from ray.train import RunConfig, ScalingConfig\n"
            "from ray.util.state import list_actors\n"
            "from raypose.driver import init_ray\n"
            "from raypose.trainer import Trainer\n"
            "init_ray(num_cpus=1, command='test')\n"
            "try:\n"
            "    Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),\n"
            f"            run_config=RunConfig(name='w', storage_path={str(tmp_path)!r})).fit()\n"
            "    print(sorted({a.class_name for a in list_actors(limit=1000)}))\n"
            "finally:\n"
            "    ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    classes = done.stdout.decode().strip().splitlines()[-1]
    assert "TrainController" in classes and "RayTrainWorker" in classes, classes
    assert "PreemptionWatcher" not in classes, classes
