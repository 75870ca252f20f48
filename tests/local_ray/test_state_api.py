"""Ray's State API, which the dashboard serves, is what Ray Train's own cleaner needs to free the
resources of a run whose controller died (an interrupted driver, a trial that ASHA stops): a
single run on a cluster without it says so in one line, a sweep is refused. Real clusters: one
head without its dashboard (ray.cluster_utils.Cluster), and the local instance with it."""

from tests.support import ray_cluster


def test_a_single_run_warns_about_a_cluster_without_a_dashboard(capsys):
    from raypose.cluster.driver import check_state_api, state_api_available

    with ray_cluster({"num_cpus": 1, "include_dashboard": False}):
        assert not state_api_available()
        capsys.readouterr()  # Ray's own lines from connecting
        check_state_api()
        out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[raypose] warning:") and "State API" in out[0]
    assert "--include-dashboard=false" in out[0]


def test_a_sweep_is_refused_on_a_cluster_without_a_dashboard():
    """Without the State API, Ray Train's cleaner cannot free the resources of a trial that ASHA
    stops, and the sweep would stall: refused in one line."""
    import pytest

    from raypose.cluster.driver import check_state_api
    from raypose.config import ConfigError

    with ray_cluster({"num_cpus": 1, "include_dashboard": False}):
        with pytest.raises(ConfigError, match=r"no dashboard \(no State API\).*sweep would stall"):
            check_state_api(sweep=True)


def test_the_local_instance_serves_the_state_api(ray_local):
    from raypose.cluster.driver import state_api_available

    assert state_api_available()
