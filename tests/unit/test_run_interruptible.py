"""raypose.cluster.driver.run_interruptible without Ray: a stop that came before the fit's thread
started (the flag console.note_interrupt sets while Ray starts) and a real SIGINT while the fit
runs both end in one Interrupted carrying stopped()'s line, never in another error, and the
signal handlers are put back. Ray is not imported here, so its shutdown is a no-op."""

import os
import signal
import threading
import time

import pytest

from raypose import console
from raypose.cluster import driver


@pytest.fixture
def fresh_flag(monkeypatch):
    """A stop flag of this test's own, so that no other test sees it set."""
    flag = threading.Event()
    monkeypatch.setattr(console, "_INTERRUPTED", flag)
    return flag


def test_a_stop_before_the_fit_started_never_starts_it(fresh_flag, capsys):
    fresh_flag.set()  # as when SIGTERM landed in Ray's start-up calls
    ran, stopped = [], []
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def stop():
        stopped.append(True)
        return "resume with the same command"

    with pytest.raises(driver.Interrupted, match="resume with the same command"):
        driver.run_interruptible(lambda: ran.append(True), stop)
    assert ran == [] and stopped == [True]
    out = capsys.readouterr().out
    assert "interrupted: stopping the workers" in out and "resume with the same command" in out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_sigint_while_the_fit_runs_stops_it_and_waits_for_its_last_writes(fresh_flag):
    finished = threading.Event()

    def work():
        os.kill(os.getpid(), signal.SIGINT)  # reaches the main thread, which waits in join()
        time.sleep(0.5)  # the fit's last storage writes, which the stop waits for (up to 5 s)
        finished.set()
        return "not returned: the run was stopped"

    with pytest.raises(driver.Interrupted, match="stopped"):
        driver.run_interruptible(work, lambda: "stopped")
    assert fresh_flag.is_set()  # the handler remembered the stop
    assert finished.is_set()
