"""One run or sweep per name (raypose.storage.runlock), on a local folder and on moto S3 over HTTP."""

import json
import socket
import time

import pytest

from raypose import storage
from raypose.storage import runlock


@pytest.fixture(params=["local", "s3"])
def loc(request, tmp_path):
    if request.param == "local":
        return storage.parse(str(tmp_path / "runs"))
    _, bucket = request.getfixturevalue("s3_bucket")
    return storage.parse(f"s3://{bucket}/runs")


def _plant(loc, name, **fields):
    record = {
        "token": "t",
        "host": socket.gethostname(),
        "pid": 1,
        "command": "raypose train",
        "started": time.time(),
        "heartbeat": time.time(),
        **fields,
    }
    storage.write_text(runlock.lock_location(loc, name), json.dumps(record))


def test_a_second_holder_is_refused_until_the_first_releases(loc):
    with runlock.hold(loc, "r", "raypose train"):
        assert storage.exists(runlock.lock_location(loc, "r"))
        with pytest.raises(
            runlock.RunLockedError,
            match=r"'r' under .* is already running: "
            r"`raypose train` as process \d+ on .*; wait for it",
        ):
            with runlock.hold(loc, "r", "raypose train"):
                pass
        with runlock.hold(loc, "other", "raypose train"):  # another name is free
            pass
    assert not storage.exists(runlock.lock_location(loc, "r"))
    with runlock.hold(loc, "r", "raypose train"):
        pass


def test_a_lock_of_an_ended_process_or_with_an_old_heartbeat_is_taken_over(loc, capsys):
    _plant(loc, "dead", pid=2**22 + 12345)  # no such process on this host
    with runlock.hold(loc, "dead", "raypose train"):
        pass
    assert "taking over the stale lock of 'dead'" in capsys.readouterr().out
    _plant(loc, "old", host="elsewhere", heartbeat=time.time() - 10 * runlock.STALE_DEFAULT)
    with runlock.hold(loc, "old", "raypose tune"):
        pass


def test_a_live_lock_of_another_host_is_refused(loc):
    _plant(loc, "r", host="gpu-node-7", pid=4242, command="raypose tune")
    with pytest.raises(
        runlock.RunLockedError, match="`raypose tune` as process 4242 on gpu-node-7"
    ):
        with runlock.hold(loc, "r", "raypose tune"):
            pass
    assert json.loads(storage.read_text(runlock.lock_location(loc, "r")))["host"] == "gpu-node-7"
