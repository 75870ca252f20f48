"""Ray's State API, which the dashboard serves, frees the resources of Ray Train runs that end
without doing so (a trial that ASHA stops): a sweep refuses a cluster without it, before any
trial starts, and a single run says so in one line. Real clusters: one head without its
dashboard (ray.cluster_utils.Cluster), and the local instance with it."""

from pathlib import Path

from conftest import ray_cluster

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def test_a_sweep_refuses_a_cluster_without_a_dashboard(tiny_data, tmp_path, capsys):
    from raypose import cli
    from raypose.driver import check_state_api, state_api_available

    storage = tmp_path / "runs"
    with ray_cluster({"num_cpus": 1, "include_dashboard": False}):
        assert not state_api_available()
        capsys.readouterr()  # Ray's own lines from connecting
        code = cli.main(["tune", "--space", str(SMOKE), "--data", str(tiny_data),
                         "--storage", str(storage), "--name", "sweep", "--samples", "2",
                         "--epochs", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        # a single run goes on, with one warning line
        check_state_api(sweep=False)
        out = capsys.readouterr().out.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "has no dashboard (no State API)" in err[0], err
    assert "--include-dashboard=false" in err[0] and "raypose tune: error:" in err[0]
    assert not (storage / "sweep").exists()  # nothing of the sweep was started
    assert len(out) == 1 and out[0].startswith("[raypose] warning:") and "State API" in out[0]


def test_the_local_instance_serves_the_state_api(ray_local):
    from raypose.driver import check_state_api, state_api_available

    assert state_api_available()
    check_state_api(sweep=True)  # does not raise
