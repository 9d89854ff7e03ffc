"""GET /debug/kv-cache (the cache map as JSON, PNG and a live HTML page) and the tiers in /metrics,
over a fake engine whose cache map and stats come from a real scheduler."""
import numpy as np

from jpaged.config import EngineConfig
from jpaged.engine.cache_map import cache_map
from jpaged.engine.kv_tiers import HostPagePool, PageTiers, tier_stats
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import Sequence
from jpaged.sampling_params import SamplingParams
from jpaged.server import BackgroundServer, build_app
from models.kv_cache import KVCacheSpec
from tests.server.conftest import HTTP
from tests.server.fake_engine import FakeEngine

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, page_size=8, dtype=np.float32)


class MappedEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        config = EngineConfig(model="fake", block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
        self.sched = Scheduler(config, num_blocks=12, max_model_len=128, num_host_pages=4,
                               tiers=PageTiers(HostPagePool(SPEC, 4)))
        for i in range(2):  # one after the other: the second finds the first's full pages
            self.sched.add(Sequence(i, f"r{i}", list(range(3, 30)), SamplingParams(max_tokens=4)))
            batch = self.sched.schedule()
            self.sched.postprocess(batch, {e.seq.seq_id: [7] for e in batch.entries if e.num_samples})

    def cache_map(self):
        return cache_map(self.sched)

    def stats(self):
        return super().stats() | tier_stats(self.sched.block_manager, SPEC)


def test_kv_cache_route_serves_json_png_and_html_and_metrics_show_the_tiers():
    with BackgroundServer(build_app(MappedEngine)) as url:
        data = HTTP.get(f"{url}/debug/kv-cache?format=json").json()
        assert data["device"]["num_pages"] == 12 and data["host"]["num_pages"] == 4
        assert data["device"]["counts"]["shared"] == 3  # the second prompt shares the first's 3 full pages
        assert {s["request_id"] for s in data["sequences"]} == {"r0", "r1"}
        png = HTTP.get(f"{url}/debug/kv-cache")
        assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
        html = HTTP.get(f"{url}/debug/kv-cache?format=html").text
        assert "setInterval" in html and "format=png" in html
        bad = HTTP.get(f"{url}/debug/kv-cache?format=svg")
        assert bad.status_code == 400 and "format" in bad.json()["error"]["message"]
        metrics = HTTP.get(f"{url}/metrics").text
        assert "jpaged_kv_host_pages_total 4.0" in metrics
        assert 'jpaged_kv_tier_bytes_total{move="offloaded"} 0.0' in metrics
