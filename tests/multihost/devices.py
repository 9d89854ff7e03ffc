"""Run a test body in a fresh Python process with N virtual CPU devices.

XLA fixes the CPU device count when the backend starts, so a test that needs 8 devices cannot share
the pytest process with tests that already started JAX: `@on_cpu_devices(8)` re-runs the undecorated
body in a child (`python -m tests.multihost.devices FILE NAME KWARGS`) and fails with its output.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_env(num_devices: int) -> dict[str, str]:
    """The environment of a child process with `num_devices` CPU devices and the repo importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    return env


def on_cpu_devices(num_devices: int, timeout: float = 300):
    def decorate(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            args = [sys.executable, "-m", "tests.multihost.devices", inspect.getfile(fn), fn.__name__,
                    json.dumps(kwargs)]
            done = subprocess.run(args, env=cpu_env(num_devices), cwd=REPO, capture_output=True,
                                  text=True, timeout=timeout)
            if done.returncode:
                raise AssertionError(f"{fn.__name__}({kwargs}) failed on {num_devices} CPU devices:\n"
                                     f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
        return run
    return decorate


def _main(file: str, name: str, kwargs: str) -> None:
    spec = importlib.util.spec_from_file_location("_multidevice_test_module", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, name).__wrapped__(**json.loads(kwargs))


if __name__ == "__main__":
    _main(*sys.argv[1:])
