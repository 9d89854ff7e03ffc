"""Engine.cache_map's data (jpaged/engine/cache_map.py) over a real scheduler: every page in exactly one
state, window-released and swapped pages named, sequences listed; and its PNG rendering."""
from jpaged.config import EngineConfig
from jpaged.engine.cache_map import DEVICE_STATES, cache_map, render_html, render_png
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import Sequence
from jpaged.sampling_params import SamplingParams


def _step(sched):
    batch = sched.schedule()
    sched.postprocess(batch, {e.seq.seq_id: [7] for e in batch.entries if e.num_samples})
    return batch


def test_cache_map_names_running_window_released_and_swapped_pages():
    config = EngineConfig(model="t", block_size=8, max_num_seqs=4, max_num_batched_tokens=64,
                          preemption_mode="swap", num_host_kv_blocks=8)
    sched = Scheduler(config, num_blocks=16, max_model_len=256, sliding_window=16)
    params = SamplingParams(max_tokens=8)
    a = Sequence(0, "a", list(range(3, 43)), params)  # 40 tokens: the window releases its first pages
    sched.add(a)
    _step(sched)
    data = cache_map(sched)
    states = [p["state"] for p in data["device"]["pages"]]
    assert sorted(data["device"]["counts"]) == sorted(DEVICE_STATES)
    assert sum(data["device"]["counts"].values()) == 16 == len(states)
    assert data["device"]["counts"]["window_released"] >= 2
    held = [p for p in data["device"]["pages"] if p["state"] == "running"]
    assert held and all(p["seq_ids"] == [0] for p in held)
    sched._preempt(a, sched.schedule())  # swap it out (as the scheduler does when pages run out)
    data = cache_map(sched)
    assert data["host"]["counts"]["swapped"] == len([h for h in a.host_block_table if h >= 0]) > 0
    assert [s["status"] for s in data["sequences"]] == ["swapped"]
    assert render_png(data, title="test").startswith(b"\x89PNG")
    assert "setInterval" in render_html()
