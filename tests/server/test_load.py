"""bench/load_test.py, small, against the fake engine: disconnects and bad requests leave no trace."""
from __future__ import annotations

import asyncio

from bench.load_test import run_load
from tests.server.conftest import fake_engine_of, fake_server


def test_load_with_disconnects_and_bad_requests_returns_every_page():
    with fake_server(num_pages=512, max_num_seqs=4, max_model_len=256, step_delay=0.005) as (url, app):
        report = asyncio.run(run_load(url, num_clients=16, disconnect_fraction=0.25, num_bad=8, seed=1, timeout=60))
        engine = fake_engine_of(app)
        assert report["passed"], report
        assert report["disconnected"] == 4
        assert engine.num_added == 16 + 1  # each good request once (+ the final probe), no bad one
        assert engine.num_aborted >= 1  # some disconnects landed mid-generation
        assert not engine.has_unfinished() and engine.free_pages == engine.num_pages
