"""`raypose bench sweep --device cpu` end to end on tiny data: trial processes that train at once
for each packing, the single trial's three feeds, the table and the JSON it writes."""

import json

import pytest

from raypose import cli


@pytest.mark.slow  # k trial processes, each importing torch, on the 2-core machine: about 25 s
def test_bench_sweep_on_the_cpu_writes_every_packing_and_feed(tiny_data, tmp_path, capsys):
    out = tmp_path / "bench" / "sweep.json"
    argv = [
        "bench",
        "sweep",
        "--data",
        str(tiny_data),
        "--device",
        "cpu",
        "--trials-per-gpu",
        "1,2",
        "--batch-size",
        "8",
        "--seconds",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        # small heads: the processes start and step quickly on the 2-core machine
        "--set",
        "model.fc1_width=32",
        "--set",
        "model.fc2_width=32",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    settings = report["settings"]
    assert settings["training_samples"] == 80  # tiny_data: 100 samples, S8's 20 held out
    assert settings["epoch_samples"] == 80 and settings["batch_size"] == 8
    assert report["machine"]["device"] == "cpu"
    assert [p["trials"] for p in report["packing"]] == [1, 2]
    for packing in report["packing"]:
        assert "error" not in packing, packing
        rows = packing["rows"]
        assert [r["trial"] for r in rows] == list(range(packing["trials"]))
        for r in rows:
            assert r["samples"] > 0 and r["samples"] == 8 * r["steps"]
            assert r["seconds"] >= 1.0  # timed for at least --seconds
            assert r["gpu_memory_peak_bytes"] is None  # CPU: no GPU memory to report
            assert r["feed"] == "host feed, 1 reader(s)"  # auto on the CPU: the host feed
        assert packing["samples_per_s"] == pytest.approx(sum(r["samples_per_s"] for r in rows))
        assert packing["trial_epochs_per_hour"] == pytest.approx(
            packing["samples_per_s"] * 3600 / 80
        )
        # every trial trained while the others did: from after the barrier to its own end
        assert packing["overlap_seconds"] > 0
    assert report["packing"][0]["vs_one_trial"] == 1.0
    two = report["packing"][1]
    assert two["vs_one_trial"] == pytest.approx(
        two["samples_per_s"] / report["packing"][0]["samples_per_s"]
    )

    feeds = {r["feed"]: r for r in report["single"]}
    assert list(feeds) == ["resident", "host feed, 1 reader", "host feed, 2 readers"]
    assert feeds["resident"]["rows"][0]["resident"] is True
    assert feeds["host feed, 2 readers"]["rows"][0]["feed"] == "host feed, 2 reader(s)"
    assert all(r["samples_per_s"] > 0 for r in report["single"])

    assert "| trials at once | samples/s summed | vs 1 trial |" in printed
    assert "| resident |" in printed and "| host feed, 2 readers |" in printed
    assert printed.rstrip().endswith(f"[raypose] bench sweep: {out}")
    # a second run does not replace the file without --force
    assert cli.main(argv) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
