"""Fractional GPUs per worker without Ray: the flag and the config keys, what a worker asks Ray
for and how many fit a node, the packing's memory check and the resident-data decision on
hand-computed figures, the device a worker falls back to, and the one-line refusals of
`raypose train`, `raypose tune` and `raypose bench sweep`."""

import math

import pytest
import torch

from raypose import cli
from raypose.cluster.capacity import fits, worker_bundle
from raypose.config import (
    Config,
    ConfigError,
    parse_gpus_per_worker,
    set_gpus_per_worker,
    set_value,
    training_memory,
)
from raypose.data.resident import RESIDENT_SAMPLE_BYTES
from raypose.train import packing

GB = 10**9


@pytest.mark.parametrize(
    "text, value",
    [("0", 0.0), ("1", 1.0), ("0.5", 0.5), ("1/4", 0.25), ("0.125", 0.125), ("1/16", 0.0625)],
)
def test_gpus_per_worker_takes_whole_gpus_and_shares(text, value):
    assert parse_gpus_per_worker(text, "--gpus-per-worker") == value


@pytest.mark.parametrize("text", ["2", "0.3", "1/3", "0.03125", "-1", "quarter", "1/0", ""])
def test_gpus_per_worker_refuses_anything_else_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker must be 0 \(CPU workers\), 1 or"):
        parse_gpus_per_worker(text, "--gpus-per-worker")


def test_a_share_sets_the_gpu_and_two_cpus_unless_cpus_were_given():
    cfg, sources = Config(), {}
    set_gpus_per_worker(cfg, "0.25", "--gpus-per-worker", sources)
    assert (cfg.scaling.gpu, cfg.scaling.gpu_share, cfg.scaling.cpus_per_worker) == (True, 0.25, 2)
    assert worker_bundle(cfg) == {"CPU": 2.0, "GPU": 0.25}
    # a config file or --set that gave the CPUs keeps them
    cfg, sources = Config(), {"scaling.cpus_per_worker": "--set cpus_per_worker=3"}
    cfg.scaling.cpus_per_worker = 3
    set_gpus_per_worker(cfg, "1/8", "--gpus-per-worker", sources)
    assert worker_bundle(cfg) == {"CPU": 3.0, "GPU": 0.125}
    # a whole GPU keeps the one CPU it had; 0 is a CPU worker
    for text, bundle in (("1", {"CPU": 1.0, "GPU": 1.0}), ("0", {"CPU": 1.0})):
        cfg = Config()
        set_gpus_per_worker(cfg, text, "--gpus-per-worker", {})
        assert worker_bundle(cfg) == bundle


def test_config_refuses_a_share_off_the_list_and_a_shared_gpu_for_several_ranks():
    cfg = Config()
    set_value(cfg, "scaling.gpu_share", 0.3, "test")
    with pytest.raises(ConfigError, match=r"scaling.gpu_share must be 1 or a share 1/k"):
        cfg.validate()
    cfg = Config()
    cfg.scaling.workers = 2
    sources = {"scaling.workers": "--workers-per-trial"}
    set_gpus_per_worker(cfg, "0.5", "--gpus-per-worker", sources)
    with pytest.raises(ConfigError, match=r"^--workers-per-trial: scaling.workers must be 1 with"):
        cfg.validate(sources)
    cfg.scaling.workers = 1
    cfg.validate(sources)
    for key, value in (("data.feed", "maybe"), ("data.reader_threads", 9)):
        cfg = Config()
        set_value(cfg, key, value, "test")
        with pytest.raises(ConfigError, match=f"^{key} must be"):
            cfg.validate()


@pytest.mark.parametrize(
    "node, bundle, expected",
    [
        ({"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.25}, 4),
        ({"CPU": 16.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.125}, 8),  # 1 // 0.125, exactly
        ({"CPU": 32.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.0625}, 16),
        ({"CPU": 6.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 0.125}, 3),  # the CPUs limit it
        ({"CPU": 64.0, "GPU": 8.0}, {"CPU": 2.0, "GPU": 0.25}, 32),
        ({"CPU": 8.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.3333}, 3),  # Ray's 4-decimal units
        ({"CPU": 8.0}, {"CPU": 1.0, "GPU": 0.25}, 0),
    ],
)
def test_shares_that_fit_a_node_as_ray_counts_them(node, bundle, expected):
    assert fits(node, bundle) == expected


def _probe(peak_gb: float, total_gb: float = 80.0) -> dict:
    return {
        "peak_reserved_bytes": int(peak_gb * GB),
        "peak_allocated_bytes": int(peak_gb * GB * 0.9),
        "total_bytes": int(total_gb * GB),
        "device_name": "NVIDIA H100 80GB HBM3",
        "batch_size": 256,
        "seconds": 1.0,
    }


def _shared(share: str, feed: str = "auto") -> Config:
    cfg = Config()
    set_gpus_per_worker(cfg, share, "--gpus-per-worker", {})
    cfg.data.feed = feed
    return cfg


def test_a_packing_within_the_gpus_memory_passes_with_its_figures():
    # 4 x (9 GB + 0.54 GB of CUDA context) = 38.1 GB <= 0.9 x 80 GB = 72 GB
    figures = packing.check_packing(_shared("0.25"), _probe(9.0), 100_000, "--gpus-per-worker")
    assert figures["trials_per_gpu"] == 4
    assert figures["need_bytes"]["total"] == 9 * GB + 2**29  # auto: the split is not counted
    assert figures["allowed_bytes"] == pytest.approx(72 * GB)


def test_a_packing_beyond_the_gpus_memory_is_refused_in_one_line():
    # 8 x 9.54 GB = 76.3 GB > 72 GB
    with pytest.raises(ConfigError) as e:
        packing.check_packing(_shared("0.125"), _probe(9.0), 100_000, "--gpus-per-worker")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("--gpus-per-worker: 8 trials on one GPU would need 8 x 9.54 GB")
    assert "= 76.3 GB, more than 72.0 GB (90%) of the NVIDIA H100 80GB HBM3's 80.0 GB" in message
    assert "data.batch_size 256 peaked at 9.00 GB" in message


def test_a_resident_split_counts_in_the_packing_only_when_it_is_forced_on():
    # 8 x (3 GB + 0.54 GB): 28.3 GB; with 120,000 resident samples (5.94 GB each) 75.8 GB
    samples = 120_000
    assert packing.check_packing(_shared("0.125"), _probe(3.0), samples, "--gpus-per-worker")
    with pytest.raises(ConfigError, match=r"\+ its resident split 5\.94 GB \(data.feed resident\)"):
        packing.check_packing(
            _shared("0.125", "resident"), _probe(3.0), samples, "--gpus-per-worker"
        )


def test_the_packing_check_is_skipped_without_a_share_or_without_cuda():
    assert packing.check_packing(_shared("1"), _probe(79.0), 10, "--gpus-per-worker") is None
    assert packing.check_packing(_shared("0.125"), None, 10, "--gpus-per-worker") is None
    assert packing.probe_training_step(_shared("0.125").to_dict()) is None  # no CUDA here


def test_resident_auto_fits_the_split_into_the_workers_share_of_the_gpu():
    cfg = _shared("0.125")
    cuda = torch.device("cuda", 0)  # the rule reads the device type and the memory given
    memory = 80 * GB
    # 0.9 x 0.125 x 80 GB = 9 GB for the split, the step's float32 estimate and the context
    room = 0.9 * 0.125 * memory - training_memory(cfg)["total_bytes"] - 2**29
    most = math.floor(room / RESIDENT_SAMPLE_BYTES)
    assert 100_000 < most < 200_000  # 4.9 GB of the demo-sized network's split fits an eighth
    assert packing.resident_decision(cfg, most, cuda, gpu_memory=memory)[0] is True
    keep, why = packing.resident_decision(cfg, most + 1, cuda, gpu_memory=memory)
    assert keep is False and "the host feed instead" in why
    # a whole GPU holds eight times the room
    assert packing.resident_decision(_shared("1"), 8 * most, cuda, gpu_memory=memory)[0]
    # the host feed on the CPU unless asked; resident and host as asked
    cpu = torch.device("cpu")
    assert packing.resident_decision(cfg, 10, cpu)[0] is False
    assert packing.resident_decision(_shared("0.125", "resident"), 10, cpu)[0] is True
    assert packing.resident_decision(_shared("0.125", "host"), 10, cuda, memory)[0] is False


def test_reader_threads_two_on_cuda_one_on_the_cpu_unless_set():
    cfg = Config()
    assert packing.reader_threads(cfg, torch.device("cuda", 0)) == 2
    assert packing.reader_threads(cfg, torch.device("cpu")) == 1
    cfg.data.reader_threads = 3
    assert packing.reader_threads(cfg, torch.device("cpu")) == 3


def test_a_worker_given_a_gpu_without_cuda_trains_on_the_cpu_and_says_why():
    assert not torch.cuda.is_available()  # the test machine
    device, note = packing.training_device(torch.device("cuda", 0), gpu=True)
    assert device == torch.device("cpu")
    assert note.startswith("[raypose] Ray assigned this worker a GPU share but torch sees no CUDA")
    assert packing.training_device(torch.device("cpu"), gpu=False) == (torch.device("cpu"), None)


# the one-line refusals, before Ray or any file (the bad-input contract)
TRAIN = ["train", "--data", "{d}", "--storage", "{d}/runs", "--name", "x", "--epochs", "1"]
TUNE = ["tune", "--space", "{d}/space.yaml", "--data", "{d}", "--storage", "{d}/runs"]
BENCH = ["bench", "sweep", "--data", "{d}/data", "--out", "{d}/out.json", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv, culprit",
    [
        ([*TRAIN, "--gpus-per-worker", "0.3"], "argument --gpus-per-worker: must be 0"),
        ([*TRAIN, "--workers", "2", "--gpus-per-worker", "1/2"], "--workers: scaling.workers"),
        ([*TRAIN, "--gpu", "--gpus-per-worker", "0"], "--gpu asks for a GPU"),
        (
            [*TUNE, "--name", "s", "--gpus-per-worker", "3/4"],
            "argument --gpus-per-worker: must be 0",
        ),
        (
            [*TUNE, "--name", "s", "--workers-per-trial", "2", "--gpus-per-worker", "0.25"],
            "--workers-per-trial: scaling.workers must be 1",
        ),
        ([*TUNE, "--name", "s", "--set", "data.feed=device"], "data.feed must be auto"),
        ([*BENCH, "--trials-per-gpu", "1,3"], "--trials-per-gpu must list"),
        ([*BENCH, "--trials-per-gpu", "2,2"], "--trials-per-gpu must list"),
        ([*BENCH, "--seconds", "0"], "--seconds must be > 0"),
        ([*BENCH, "--batch-size", "0"], "--batch-size"),
        ([*BENCH[:-1], "cuda"], "--device cuda: torch sees no CUDA device here"),
        ([*BENCH, "--set", "data.feed=always"], "--set data.feed=always"),
    ],
)
def test_bad_flags_are_refused_in_one_line_with_exit_2(argv, culprit, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("parameters:\n  lr: {distribution: fixed, value: 0.001}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        rc = cli.main([a.format(d=tmp_path) for a in argv])
    except SystemExit as e:  # argparse's own errors (a flag's type) exit from parse_args
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert culprit in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
