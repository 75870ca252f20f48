"""Cluster behaviour on real multi-node Ray clusters on this machine: workers spread over nodes,
elastic training through a lost node, a sweep whose trial loses its node, and autoscaling from
zero GPU nodes with Ray's fake multi-node provider. Storage is moto's S3 server over HTTP or a
local folder; nothing of Ray or storage is mocked."""

import ast
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from raypose.cluster.driver import preflight
from raypose.train.run import build_trainer
from tests.support import free_port, ray_cluster, tiny_config, wait_until

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")


class EpochLog:
    """A Ray Train UserCallback (it runs in the controller actor) that appends each reported
    epoch to a file: the epoch, the group's size, every rank's node id, whether a checkpoint came
    with it, and the wall time."""

    def __new__(cls, path):
        import ray.train

        class _Log(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "epoch": metrics[0]["epoch"],
                                "workers": metrics[0]["workers"],
                                "nodes": [m["node_id"] for m in metrics],
                                "checkpoint": checkpoint is not None,
                                "epoch_seconds": metrics[0]["epoch_seconds"],
                                "ended_at": metrics[0]["epoch_ended_at"],
                                "time": time.time(),
                            }
                        )
                        + "\n"
                    )

        return _Log()


def logged(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture
def two_nodes():
    """A head of 1 CPU and one more node of 1 CPU (conftest.ray_cluster)."""
    with ray_cluster(
        {"num_cpus": 1}, [{"num_cpus": 1}], configure_logging=False, log_to_driver=True
    ) as (cluster, (node,)):
        yield cluster, node


def head_id(cluster):
    return cluster.head_node.node_id


@pytest.mark.slow  # about 70 s here
def test_spread_puts_one_worker_on_each_node_with_checkpoints_in_s3(
    two_nodes, tiny_data, s3_bucket, tmp_path
):
    import s3fs

    cluster, node = two_nodes
    endpoint, bucket = s3_bucket
    cfg = tiny_config(tiny_data, f"s3://{bucket}/exp", name="spread", scaling__placement="SPREAD")
    log = tmp_path / "epochs.jsonl"
    result = build_trainer(cfg, "spread", preflight(cfg), callbacks=[EpochLog(str(log))]).fit()
    assert result.error is None and result.metrics["epoch"] == 2
    epochs = logged(log)
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        # rank 0 and rank 1 on the two different nodes (ids from the workers themselves)
        assert sorted(e["nodes"]) == sorted([head_id(cluster), node.node_id]), e
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})  # HTTP to 127.0.0.1
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/exp/spread", refresh=True)}
    assert {"epoch_0001", "epoch_0002"} <= names
    assert fs.exists(f"{bucket}/exp/spread/epoch_0002/manifest.json")


@pytest.fixture
def head_and_two_nodes():
    """A head without CPUs and two nodes of 1 CPU each: both workers of a 2-worker group sit on
    the added nodes, so the node of rank 1 can be killed whichever node Ray gave rank 1 (ranks
    follow placement-group bundle order, not node order)."""
    with ray_cluster(
        {"num_cpus": 0}, [{"num_cpus": 1}] * 2, configure_logging=False, log_to_driver=True
    ) as (cluster, nodes):
        yield cluster, nodes


# Enough epochs that the group of one is still training when the node returns: growing back took
# 38 s from add_node to an epoch with 2 workers, while one worker trains an epoch of the tiny data
# in about 2-3 s (bf16); with 6 epochs a fresh-clone run finished all of them with one worker first.
ELASTIC_EPOCHS = 30


@pytest.mark.long  # out of .ci/run's time budget: `python -m pytest -m long`
def test_elastic_group_shrinks_when_a_node_dies_and_grows_back(
    head_and_two_nodes, tiny_data, s3_bucket, tmp_path, capsys
):
    cluster, nodes = head_and_two_nodes
    endpoint, bucket = s3_bucket
    cfg = tiny_config(
        tiny_data,
        f"s3://{bucket}/exp",
        name="elastic",
        scaling__placement="SPREAD",
        scaling__min_workers=1,
        scaling__resize_interval_s=2.0,
        storage__max_failures=4,
        schedule__epochs=ELASTIC_EPOCHS,
    )
    log = tmp_path / "epochs.jsonl"
    trainer = build_trainer(cfg, "elastic", preflight(cfg), callbacks=[EpochLog(str(log))])
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()))
    thread.start()
    try:
        first = wait_until(lambda: logged(log), 300, "the first epoch")[0]
        assert first["workers"] == 2 and first["checkpoint"]
        assert sorted(first["nodes"]) == sorted(n.node_id for n in nodes), first
        # kill the node of rank 1 the way a lost machine goes, while epoch 2 trains
        victim = next(n for n in nodes if n.node_id == first["nodes"][1])
        survivor = next(n for n in nodes if n is not victim)
        cluster.remove_node(victim, allow_graceful=False)
        killed_at = time.time()
        # an epoch the group of 2 finished before the kill can reach the controller after it
        # (its report waits for the checkpoint upload), so "after the kill" goes by when the
        # workers finished the epoch, not by when the callback saw it
        shrunk = wait_until(
            lambda: [e for e in logged(log) if e["ended_at"] > killed_at],
            400,
            "an epoch after the kill",
        )[0]
        recovery = shrunk["time"] - killed_at
        assert shrunk["workers"] == 1 and shrunk["nodes"] == [survivor.node_id], shrunk
        # a node comes back: the group grows to 2 again at the next resize check
        new_node = cluster.add_node(num_cpus=1)
        added_at = time.time()
        grown = wait_until(
            lambda: [e for e in logged(log) if e["time"] > added_at and e["workers"] == 2],
            400,
            "an epoch with 2 workers again",
        )[0]
        assert sorted(grown["nodes"]) == sorted([survivor.node_id, new_node.node_id])
    finally:
        thread.join(timeout=600)
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.error is None and result.metrics["epoch"] == ELASTIC_EPOCHS
    epochs = logged(log)
    # every epoch finished exactly once, in order: none lost, none repeated across the restarts
    assert [e["epoch"] for e in epochs] == list(range(1, ELASTIC_EPOCHS + 1)), epochs
    assert all(e["checkpoint"] for e in epochs)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/exp/elastic", refresh=True)}
    assert f"epoch_{ELASTIC_EPOCHS:04d}" in names
    sizes = [e["workers"] for e in epochs]
    with capsys.disabled():
        # where the time goes: the epoch itself (trained again from its start, by one worker),
        # and the rest: noticing the lost node, trying a group of 2 again, starting a group of
        # 1, and loading the checkpoint from S3
        print(
            f"\n[elastic] workers per epoch {sizes}; from the kill to the next finished epoch "
            f"{recovery:.1f} s (epoch {shrunk['epoch']}: {shrunk['epoch_seconds']:.1f} s of "
            f"training by 1 worker, {recovery - shrunk['epoch_seconds']:.1f} s to detect, "
            f"restart and resume); from the new node to an epoch with 2 workers "
            f"{grown['time'] - added_at:.1f} s (epoch {grown['epoch']}); epoch seconds "
            f"{[round(e['epoch_seconds'], 1) for e in epochs]}"
        )


# ----------------------------------------------------------------------------------------------
# A sweep whose trial loses its node


def _trial_rows(exp_dir: Path):
    """trial id -> the epochs its result.json holds, in order."""
    rows = {}
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = [r["epoch"] for r in lines]
    return rows


@pytest.mark.long  # out of .ci/run's time budget: `python -m pytest -m long`
def test_sweep_trial_lost_with_its_node_is_retried_from_its_checkpoint(
    tiny_data, tmp_path, monkeypatch
):
    import optuna

    from raypose.search.sweep import run_sweep

    # The head has too little memory for a trial's Tune function (raypose.search.sweep reserves 768 MiB
    # for it), so every trial driver runs on the other node, and killing that node loses the trial
    with ray_cluster(
        {"num_cpus": 1, "memory": 256 * 1024**2},
        [{"num_cpus": 1, "memory": 4 * 1024**3}],
        configure_logging=False,
    ) as (cluster, (node,)):
        monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
        # every checkpoint is kept: the test reads epoch 1's after the run, and with the default
        # of 2 retention drops it whenever epochs 2 and 3 score better
        cfg = tiny_config(
            tiny_data,
            tmp_path / "exp",
            schedule__epochs=3,
            scaling__workers=1,
            storage__max_failures=2,
            storage__keep_checkpoints=3,
        )
        exp_dir = tmp_path / "exp" / "lost"
        outcome = {}
        thread = threading.Thread(
            target=lambda: outcome.setdefault(
                "best", run_sweep(cfg, SMOKE, "lost", samples=2, max_concurrent=1)
            )
        )
        thread.start()
        try:
            rows = wait_until(
                lambda: {t: e for t, e in _trial_rows(exp_dir).items() if e},
                400,
                "a trial's first epoch",
            )
            (victim,) = rows
            checkpoint = exp_dir / "train" / victim / "epoch_0001"
            wait_until(lambda: (checkpoint / "manifest.json").exists(), 60, "its checkpoint")
            stamp = (checkpoint / "manifest.json").stat().st_mtime
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(num_cpus=1, memory=4 * 1024**3)  # where the retried trial can run
        finally:
            thread.join(timeout=900)
        assert not thread.is_alive()
        best = outcome["best"]
    rows = _trial_rows(exp_dir)
    assert len(rows) == 2
    # the lost trial went on from its checkpoint: epoch 1 ran once, and its checkpoint is the
    # file written before the kill
    assert rows[victim][:2] == [1, 2] and rows[victim].count(1) == 1, rows
    assert (checkpoint / "manifest.json").stat().st_mtime == stamp
    state = json.loads(sorted(exp_dir.glob("experiment_state-*.json"))[-1].read_text())
    # each entry: the trial's JSON and its run metadata's, which counts the failures
    failures = {
        json.loads(t)["trial_id"]: json.loads(meta)["num_failures"]
        for t, meta in state["trial_data"]
    }
    assert failures[victim] >= 1, failures  # Tune retried it (FailureConfig.max_failures)
    # the study holds each trial exactly once, finished, with the value best.json has for it
    study = optuna.load_study(study_name="lost", storage=best["study"]["url"])
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    by_params = {json.dumps(r["params"], sort_keys=True): r for r in best["trials"]}
    for t in study.trials:
        assert t.value == pytest.approx(
            by_params[json.dumps(t.params, sort_keys=True)]["best_val_mpjpe"]
        )


# ----------------------------------------------------------------------------------------------
# Autoscaling from zero: Ray's fake multi-node provider


def fake_cluster_config(port: int, worker_types: dict) -> dict:
    """An autoscaler config for the fake multi-node provider (see ray.autoscaler._private.
    fake_multi_node): a head of 1 CPU that launches nothing itself, and worker_types."""
    return {
        "cluster_name": f"raypose-fake-{port}",
        "max_workers": 4,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        # without gcs_address the launched nodes look for a head on port 6379 and never join
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}"},
        "auth": {"ssh_user": "ubuntu"},
        # the fake provider names its head node type ray.head.default; another name makes the
        # autoscaler launch and remove phantom heads
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            **{
                name: {"resources": r, "node_config": {}, "min_workers": 0, "max_workers": 2}
                for name, r in worker_types.items()
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclasses.dataclass
class FakeCluster:
    address: str  # the GCS address, for `--address` and the State API
    client_address: str  # the head's Ray Client server, ray://...


@pytest.fixture
def fake_autoscaling_cluster():
    """Starts `ray start --head` with the fake multi-node autoscaler, a config of the test's
    node types and a Ray Client server; yields a function taking worker_types and returning a
    FakeCluster. Teardown ends this process's own Ray connection, if a test left one, then kills
    exactly the processes of that start (its own session), one pid at a time."""
    started = []

    def start(worker_types: dict) -> FakeCluster:
        port, client_port = free_port(), free_port()
        temp = Path(tempfile.mkdtemp(prefix="rp-fake-"))  # short: Unix socket paths are limited
        config = temp / "autoscaler.json"
        settings = fake_cluster_config(port, worker_types)
        # The fake provider starts its nodes itself and refuses tag updates: the autoscaler's
        # node updater fails on each launched node and terminates it as "launch failed" a few
        # seconds after it joins, unless updaters are off
        settings["provider"].update(disable_node_updaters=True, disable_launch_config_check=True)
        config.write_text(json.dumps(settings))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--num-cpus",
                "1",
                "--port",
                str(port),
                f"--autoscaling-config={config}",
                "--temp-dir",
                str(temp / "ray"),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(free_port()),
                # Ray's default client port would clash with any other head on this machine
                "--ray-client-server-port",
                str(client_port),
                "--disable-usage-stats",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started.append((proc.pid, temp))  # the session id of everything this start runs
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, out[-3000:]
        return FakeCluster(f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}")

    yield start
    import ray

    if ray.is_initialized():  # a driver left connected would wait on the killed head
        ray.shutdown()
    for session, temp in started:
        _kill_session(session)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_session(session: int) -> None:
    import psutil

    for _ in range(3):  # the monitor may start a node while its siblings go
        procs = [p for p in psutil.process_iter(["pid"]) if _session_of(p) == session]
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)


def _session_of(proc) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def _train_gpu(address, data, storage, extra=()):
    args = [
        sys.executable,
        "-m",
        "raypose.cli",
        "train",
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--name",
        "gpu",
        "--epochs",
        "1",
        "--workers",
        "1",
        "--gpu",
        "--set",
        "data.batch_size=8",
        "--address",
        address,
        *extra,
    ]
    return subprocess.Popen(
        args,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _gpu_nodes(address):
    from ray.util.state import list_nodes

    return [
        n
        for n in list_nodes(address=address, detail=True)
        if n.state == "ALIVE" and n.resources_total.get("GPU", 0) >= 1
    ]


def _requested(address) -> list | None:
    """The bundles the autoscaler holds from request_resources, as `ray status` lists them:
    (shape, count) pairs; None when `ray status` has no such section (yet)."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "status", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    lines = out.splitlines()
    if "From request_resources:" not in lines:
        return None
    listed = []
    for line in lines[lines.index("From request_resources:") + 1 :]:
        if not line.startswith(" ") or line.strip() == "(none)":
            break
        # e.g. {'GPU': 1, 'CPU': 1}: 1 from request_resources(), in either order of the keys
        shape, count = line.strip().split("}: ", 1)
        listed.append((ast.literal_eval(shape + "}"), count))
    return listed


GPU_REQUEST = ({"CPU": 1, "GPU": 1}, "1 from request_resources()")


@contextlib.contextmanager
def _connected(address):
    import ray

    for attempt in range(3):
        try:
            ray.init(address=address, configure_logging=False)
            break
        except ConnectionAbortedError:
            # a Ray Client connection made just after `ray start` sometimes fails: the server
            # that the head starts for the client exits at once ("SpecificServer startup
            # failed" in its ray_client_server.err); the next connection works
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow  # a fake autoscaling cluster: about 25 s each
def test_gpu_from_zero_nodes_waits_for_the_autoscaler(
    fake_autoscaling_cluster, tiny_data, tmp_path
):
    """No GPU node is up, but a node type has one: `raypose train --gpu` is accepted, says it
    waits for the autoscaler, and the autoscaler launches a node of that type. The test stops
    the driver there: the fake "GPU" is only a resource label, without CUDA."""
    address = fake_autoscaling_cluster({"gpu_node": {"CPU": 1, "GPU": 1}}).address
    assert _gpu_nodes(address) == []
    driver = _train_gpu(address, tiny_data, tmp_path / "exp")
    lines = []
    try:
        for line in driver.stdout:
            lines.append(line)
            if "the cluster now holds" in line:
                break
        text = "".join(lines)
        assert (
            "waiting up to 900 s for the autoscaler to add nodes: 1 worker(s) of {CPU: 1, GPU: 1}"
        ) in text, text
        assert "the cluster now holds 1 such worker(s)" in text, text
        nodes = _gpu_nodes(address)
        assert len(nodes) == 1, nodes
    finally:
        _kill_session(driver.pid)
        driver.wait(timeout=30)


@pytest.mark.slow  # a fake autoscaling cluster: about 60 s
def test_gpu_worker_is_placed_on_the_gpu_node_the_autoscaler_launches(
    fake_autoscaling_cluster, tiny_data, tmp_path
):
    """`raypose train --gpu` from zero GPU nodes: Ray Train's worker runs on the gpu_node that
    the autoscaler launched for it (the State API says where). The worker may then fail at its
    first CUDA call, since the fake GPU has none; the test stops the driver once it is placed."""
    from ray.util.state import list_actors

    address = fake_autoscaling_cluster({"gpu_node": {"CPU": 1, "GPU": 1}}).address
    driver = _train_gpu(address, tiny_data, tmp_path / "exp")
    lines = []
    # read the driver's output all along, so that it never blocks on a full pipe
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    try:

        def placed():
            workers = list_actors(
                address=address,
                filters=[("class_name", "=", "RayTrainWorker")],
                detail=True,
                raise_on_missing_output=False,
            )
            return [w for w in workers if w.node_id]

        try:
            workers = wait_until(placed, 300, "a RayTrainWorker placed on a node")
        except AssertionError:
            raise AssertionError("".join(lines)) from None
        gpu_ids = {n.node_id for n in _gpu_nodes(address)}
        assert len(gpu_ids) == 1, "".join(lines)
        assert {w.node_id for w in workers} == gpu_ids, (workers, gpu_ids)
        assert "the cluster now holds 1 such worker(s)" in "".join(lines)
    finally:
        _kill_session(driver.pid)
        driver.wait(timeout=30)


@pytest.mark.slow  # a fake autoscaling cluster: about 25 s each
def test_gpu_no_node_type_has_one_ends_after_the_bounded_wait(
    fake_autoscaling_cluster, tiny_data, tmp_path
):
    """Ray's public API does not say which node types an autoscaler has: a GPU that no node type
    offers is waited for like one that is starting, up to scaling.autoscaler_wait_s, and then
    refused in one line that points to `ray status`."""
    address = fake_autoscaling_cluster({"cpu_node": {"CPU": 2}}).address
    driver = _train_gpu(
        address, tiny_data, tmp_path / "exp", extra=("--set", "scaling.autoscaler_wait_s=5")
    )
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("raypose train: error:")]
    assert len(errors) == 1, out
    error = errors[0]
    assert "--workers and --gpu: " in error, error
    assert "gave up after 5 s waiting for the autoscaler: 1 worker(s) of {CPU: 1, GPU: 1}" in error
    assert "the cluster holds 0 such worker(s)" in error, error
    assert "`ray status`" in error and "scaling.autoscaler_wait_s" in error, error
    assert _gpu_nodes(address) == []
    assert not (tmp_path / "exp" / "gpu").exists()  # nothing was written for the run


@pytest.mark.slow  # a fake autoscaling cluster: about 25 s each
def test_wait_for_the_autoscaler_gives_up_in_one_line(
    fake_autoscaling_cluster, tiny_data, tmp_path
):
    """A GPU the autoscaler could add but that is not up within scaling.autoscaler_wait_s (0 s
    here, so the outcome does not depend on how fast a node starts) ends the run in one line."""
    address = fake_autoscaling_cluster({"gpu_node": {"CPU": 1, "GPU": 1}}).address
    driver = _train_gpu(
        address, tiny_data, tmp_path / "exp", extra=("--set", "scaling.autoscaler_wait_s=0")
    )
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("raypose train: error:")]
    assert len(errors) == 1, out
    assert (
        "gave up after 0 s waiting for the autoscaler: 1 worker(s) of {CPU: 1, GPU: 1}" in errors[0]
    ), errors[0]
    assert "scaling.autoscaler_wait_s" in errors[0]


# raypose.cluster.capacity in this process, by GCS address and by Ray Client


def _live_placement_groups(address) -> list:
    from ray.util.state import list_placement_groups

    return list_placement_groups(
        address=address, filters=[("state", "!=", "REMOVED")], raise_on_missing_output=False
    )


@pytest.mark.slow  # a fake autoscaling cluster: about 20 s each
@pytest.mark.parametrize(
    "client, group",
    [(False, False), (True, False), (True, True)],
    ids=["address", "ray-client", "ray-client-placement-group"],
)
def test_check_resources_waits_for_the_autoscaler_in_process(
    fake_autoscaling_cluster, tiny_data, tmp_path, capsys, monkeypatch, client, group
):
    """group: ask the way raypose asks on Ray before 2.54, with a placement group."""
    from raypose.cluster import capacity

    monkeypatch.setattr(capacity, "_request_breaks_the_autoscaler", lambda: group)
    cluster = fake_autoscaling_cluster({"gpu_node": {"CPU": 1, "GPU": 1}})
    cfg = tiny_config(
        tiny_data,
        tmp_path / "exp",
        name="gpu",
        scaling__workers=1,
        scaling__gpu=True,
        scaling__autoscaler_wait_s=120,
    )
    with _connected(cluster.client_address if client else cluster.address) as ray:
        assert ray.util.client.ray.is_connected() == client
        result = capacity.check_resources(cfg, "--workers and --gpu")
        out = capsys.readouterr().out
        assert (
            "[raypose] waiting up to 120 s for the autoscaler to add nodes: 1 worker(s) of "
            "{CPU: 1, GPU: 1} for the run; nodes up: 1 with {CPU: 1}\n"
        ) in out, out
        assert "[raypose] the cluster now holds 1 such worker(s)\n" in out, out
        assert (result.now, result.most) == (1, None), result
        assert result.offer == "nodes up: 2 with {CPU: 2, GPU: 1}", result
        # once the workers fit, the request is withdrawn: Ray Train's placement group asks now
        wait_until(lambda: _requested(cluster.address) == [], 60, "the request withdrawn")
        assert _live_placement_groups(cluster.address) == []
        # what is up now fits: no wait, no request
        assert capacity.check_resources(cfg, "--workers and --gpu").now == 1
        assert "[raypose]" not in capsys.readouterr().out


@pytest.mark.slow  # a fake autoscaling cluster: about 30 s
def test_check_resources_gives_up_on_the_autoscaler_by_ray_client(
    fake_autoscaling_cluster, tiny_data, tmp_path
):
    """Under Ray Client: the request stands while raypose waits, is withdrawn when it gives up,
    and the error is one line with the flags, the ask, what is up and where to look."""
    from raypose.cluster.capacity import ClusterWaitError, check_resources

    cluster = fake_autoscaling_cluster({"cpu_node": {"CPU": 2}})
    cfg = tiny_config(
        tiny_data,
        tmp_path / "exp",
        name="gpu",
        scaling__workers=1,
        scaling__gpu=True,
        scaling__autoscaler_wait_s=15,
    )
    seen, statuses = [], []
    done = threading.Event()

    def watch():  # `ray status` from another process, while this one waits
        while not done.is_set() and not seen:
            statuses.append(_requested(cluster.address))
            if GPU_REQUEST in (statuses[-1] or []):
                seen.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    with _connected(cluster.client_address):
        watcher.start()
        start = time.monotonic()
        try:
            with pytest.raises(ClusterWaitError) as raised:
                check_resources(cfg, "--workers and --gpu")
        finally:
            done.set()
            watcher.join(timeout=130)
        waited = time.monotonic() - start
    assert seen, f"the request never showed in `ray status`: {statuses}"
    assert 15 <= waited < 60, waited
    error = str(raised.value)
    assert "\n" not in error, error
    assert error.startswith(
        "--workers and --gpu: gave up after 15 s waiting for the autoscaler: "
        "1 worker(s) of {CPU: 1, GPU: 1} for the run, and the cluster holds 0 "
        "such worker(s) (nodes up: 1 with {CPU: 1})"
    ), error
    assert "`ray status` shows the autoscaler's pending and infeasible requests" in error, error
    assert error.endswith("scaling.autoscaler_wait_s sets the wait"), error
    wait_until(lambda: _requested(cluster.address) == [], 60, "the request withdrawn")
    assert _gpu_nodes(cluster.address) == []


@pytest.mark.slow  # a local instance: about 10 s
def test_local_instance_refuses_a_gpu_at_once(ray_local, tiny_data, tmp_path, capsys):
    """Ray started by raypose itself (local=True): no autoscaler, so what does not fit now is
    refused at once, in one line, without waiting or asking anything."""
    from raypose.cluster.capacity import check_resources
    from raypose.config import ConfigError

    cfg = tiny_config(
        tiny_data, tmp_path / "exp", name="gpu", scaling__workers=1, scaling__gpu=True
    )
    start = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        check_resources(cfg, "--workers and --gpu", local=True)
    assert time.monotonic() - start < 10
    assert str(raised.value) == (
        "--workers and --gpu: 1 worker(s) of {CPU: 1, GPU: 1} for the run, but the Ray cluster "
        "can never offer that (at most 0 such worker(s); the local Ray instance that raypose "
        "started holds {CPU: 2}; no autoscaler: that is all there is)"
    )
    cfg = tiny_config(tiny_data, tmp_path / "exp", scaling__workers=3)
    with pytest.raises(
        ConfigError,
        match=r"^--workers: 3 worker\(s\) of \{CPU: 1\} for one trial, "
        r"but the Ray cluster can never offer that \(at most 2 such worker",
    ):
        check_resources(cfg, "--workers", what="one trial", local=True)
    cfg = tiny_config(tiny_data, tmp_path / "exp", scaling__workers=2)
    capacity = check_resources(cfg, "--workers", local=True)
    assert (capacity.now, capacity.most) == (2, 2)
    assert "waiting" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "node, bundle, expected",
    [
        ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, 1),  # the GPU limits it
        ({"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}, 0),  # no GPU on the node
        ({"CPU": 4.0, "GPU": 2.0}, {"CPU": 2.0}, 2),  # CPU only: 4 // 2
        ({"CPU": 0.0}, {"CPU": 1.0}, 0),  # a head without CPUs
    ],
)
def test_workers_that_fit_on_a_node(node, bundle, expected):
    from raypose.cluster.capacity import fits

    assert fits(node, bundle) == expected


def test_brief_shows_what_a_person_asks_for():
    from raypose.cluster.capacity import brief

    assert (
        brief(
            {
                "memory": 1e9,
                "object_store_memory": 1e9,
                "node:__internal_head__": 1.0,
                "node:10.0.0.1": 1.0,
                "accelerator_type:H100": 1.0,
                "GPU": 1.0,
                "CPU": 2.0,
                "TPU": 4.0,
                "CPU_group_0_fe602990ce0d718ec971163b3ea901000000": 1.0,
                "bundle_group_fe602990ce0d718ec971163b3ea901000000": 1000.0,
            }
        )
        == "{CPU: 2, GPU: 1, TPU: 4}"
    )
