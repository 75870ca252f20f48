"""raypose.backend: Ray Train's controller and a sweep trial's driver load raypose's trainer without
importing torch (each such import cost a trial seconds of start-up before its first step). The
process groups it sets up are exercised by the multi-worker runs in test_train_ray.py and
test_cluster_ray.py."""

import os
import subprocess
import sys
import textwrap

from ray import cloudpickle  # what Ray pickles with

from raypose.backend import TorchBackendConfig
from raypose.driver import PREEMPTION_WATCHER_ENV
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


def _on_fresh_local_instance(body: str, env: dict, cwd, timeout: int) -> str:
    """Runs body (Python source, `ray` imported) in a new process on a Ray instance that
    raypose.driver.init_ray starts there, and returns the last line it printed. The new process
    keeps this test's environment (and any earlier Ray instance of the pytest process) out."""
    code = ("import ray\n"
            "from raypose.driver import init_ray\n"
            "init_ray(num_cpus=1, command='test')\n"
            "try:\n"
            + textwrap.indent(body, "    ") +
            "finally:\n"
            "    ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout,
                          env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode().strip().splitlines()[-1]


def _environment_without(*names: str) -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *names)}


def test_local_instance_runs_workers_at_niceness_0(tmp_path):
    # Ray's default runs worker processes at niceness 15, below its daemons; raypose's local
    # instance runs them at 0 (they are the training). The Train V2 preemption watcher, which the
    # local instance turns off (next test), stays on when the user says so.
    env = _environment_without("RAY_worker_niceness")
    env[PREEMPTION_WATCHER_ENV] = "1"
    last = _on_fresh_local_instance(
        "import os\n"
        "print(*ray.get(ray.remote(lambda: (os.nice(0), os.environ.get(\n"
        f"    {PREEMPTION_WATCHER_ENV!r}))).remote()))\n", env, tmp_path, timeout=180)
    assert last.split() == ["0", "1"]


def test_local_instance_runs_without_preemption_watcher(tmp_path):
    # Train V2 gives every run a PreemptionWatcher actor (one more process per run) unless
    # RAY_TRAIN_ENABLE_PREEMPTION_WATCHER is off; raypose's own one-node instance turns it off
    # (a value the user set is kept: the test above). A real run of raypose's trainer on a fresh
    # instance, whose actors are then listed: the controller and the worker, no watcher.
    classes = _on_fresh_local_instance(
        "from ray.train import RunConfig, ScalingConfig\n"
        "from ray.util.state import list_actors\n"
        "from raypose.trainer import Trainer\n"
        "Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),\n"
        f"        run_config=RunConfig(name='w', storage_path={str(tmp_path)!r})).fit()\n"
        "print(sorted({a.class_name for a in list_actors(limit=1000)}))\n",
        _environment_without(PREEMPTION_WATCHER_ENV), tmp_path, timeout=240)
    assert "TrainController" in classes and "RayTrainWorker" in classes, classes
    assert "PreemptionWatcher" not in classes, classes
