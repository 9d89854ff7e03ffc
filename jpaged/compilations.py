"""A process-wide count of XLA backend compilations, for `/metrics` and the benchmarks."""
from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _BACKEND_COMPILE:
        with _lock:
            _count += 1


def install() -> None:
    """Starts counting (idempotent); compilations before the first call are not counted."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def count() -> int:
    """Backend compilations in this process since `install()`."""
    return _count
