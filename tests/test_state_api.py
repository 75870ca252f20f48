"""Ray's State API, which the dashboard serves, is what Ray Train's own cleaner needs to free the
resources of a run whose controller died (an interrupted driver): a single run on a cluster
without it says so in one line. A sweep does not need it: its driver removes the placement groups
of trials that Tune ended (ASHA's stops) itself. Real clusters: one head without its dashboard
(ray.cluster_utils.Cluster), and the local instance with it."""

import time

from conftest import ray_cluster, tiny_config, wait_until


def test_a_single_run_warns_about_a_cluster_without_a_dashboard(capsys):
    from raypose.driver import check_state_api, state_api_available

    with ray_cluster({"num_cpus": 1, "include_dashboard": False}):
        assert not state_api_available()
        capsys.readouterr()  # Ray's own lines from connecting
        check_state_api()
        out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[raypose] warning:") and "State API" in out[0]
    assert "--include-dashboard=false" in out[0]


def test_a_sweep_frees_a_trial_ended_with_its_process_without_a_dashboard(tiny_data, tmp_path):
    """A Ray actor stands in for a sweep's trial (Tune's process for it): it runs a long Ray Train
    run as a trial does, without Ray's cleaner. Killing it (what Tune does when ASHA stops a
    trial) kills the run's controller with it, and Ray keeps the run's placement group, 1 CPU,
    until the job ends. The sweep's cleanup (OrphanedPlacementGroups, in the driver) removes it;
    the group this driver made itself (as Tune makes one per trial) stays."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from raypose.trainer import (OrphanedPlacementGroups, actor_placement_groups,
                                 orphaned_placement_groups)

    cfg = tiny_config(tiny_data, tmp_path / "runs", name="ended", workers=1,
                      schedule__epochs=200).to_dict()

    @ray.remote(num_cpus=0)
    class TrialProcess:
        def run(self, config):
            from raypose.config import config_from_dict
            from raypose.driver import preflight
            from raypose.train import build_trainer

            c = config_from_dict(config)
            build_trainer(c, c.storage.name, preflight(c), ray_placement_group_cleaner=False).fit()

    def free_cpus():
        return ray.available_resources().get("CPU", 0.0)

    with ray_cluster({"num_cpus": 2, "include_dashboard": False}):
        own = placement_group([{"CPU": 0.5}])
        ray.get(own.ready(), timeout=60)
        trial = TrialProcess.remote()
        trial.run.remote(cfg)
        wait_until(lambda: len(actor_placement_groups()) == 1, 60, "the run's placement group")
        (run_group, dead), = actor_placement_groups()
        assert not dead and orphaned_placement_groups() == []  # its controller is alive
        wait_until(lambda: free_cpus() == 0.5, 60, "the run's CPU reserved")

        ray.kill(trial)  # the trial's process, as Tune ends it; the run's controller dies with it
        wait_until(lambda: orphaned_placement_groups() == [run_group], 60, "the controller's death")
        time.sleep(2.0)
        assert free_cpus() == 0.5  # Ray keeps the group (and its CPU) while the job lives

        with OrphanedPlacementGroups(interval_s=0.2) as cleanup:
            wait_until(lambda: free_cpus() == 1.5, 30, "the CPU back")
        assert cleanup.removed == 1
        assert actor_placement_groups() == []
        assert placement_group_table(own)["state"] == "CREATED"  # the driver's own group stays


def test_the_local_instance_serves_the_state_api(ray_local):
    from raypose.driver import state_api_available

    assert state_api_available()
