"""Multi-host serving (jpaged/engine/multihost.py): 2 processes x 2 CPU devices on loopback run one TP 4
engine (process 0 schedules, process 1 follows its calls) and give a one-device engine's greedy tokens."""
import json
import socket
import subprocess
import sys

import pytest

from tests.multihost.devices import REPO, cpu_env


@pytest.mark.slow
def test_tp_engine_over_two_processes_reproduces_one_device():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = [sys.executable, "-m", "tests.multihost.engine_worker", "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen(worker + [str(i)], env=cpu_env(2), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    assert got["processes"] == 2 and got["devices"] == 4
    assert got["tokens"] == got["reference"] and len(got["tokens"]) == 4  # the third prompt asked for n=2
    assert '"tokens"' not in outs[1][0]  # the follower only follows
