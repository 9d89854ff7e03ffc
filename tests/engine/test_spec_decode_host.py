"""Speculative decoding's host side: n-gram lookup, the config, acceptance, and the scheduler's
verify-and-roll-back cycle (a hypothesis fuzz against a fake model: the same outputs as without
proposals, every query reads its own tokens, no rejected token ever reaches the prefix cache)."""
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from jpaged.config import EngineConfig
from jpaged.engine.scheduler import Scheduler
from jpaged.engine.sequence import Sequence
from jpaged.engine.spec_decode import ngram, verify
from jpaged.engine.spec_decode.config import SpeculativeConfig
from jpaged.sampling_params import SamplingParams
from tests.engine.test_scheduler import FakeModel

PS = 8


def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert ngram.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], k=2, max_n=3, min_n=1) == [7, 1]
    # The longest n wins: the 2-gram [5, 6] matched once (then 8), the 1-gram [6] later (then 4).
    assert ngram.propose([5, 6, 8, 6, 4, 5, 6], k=1, max_n=2, min_n=1) == [8]
    assert ngram.propose([1, 2, 3, 4], k=3, max_n=2, min_n=1) == []
    assert ngram.propose([4, 4], k=3, max_n=4, min_n=1) == [4]
    assert ngram.propose([7], k=3, max_n=4, min_n=1) == []


def test_accepted_length_counts_confirmed_proposals():
    assert verify.accepted_length([5, 6, 7], [5, 6, 1, 2]) == 2
    assert verify.accepted_length([5, 6, 7], [5, 6, 7, 2]) == 3
    assert verify.accepted_length([5], [4, 5]) == 0
    with pytest.raises(ValueError, match="one token more"):
        verify.accepted_length([5], [5])


def test_config_parses_dicts_and_json_and_refuses_bad_keys():
    cfg = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    assert cfg.speculative_config == SpeculativeConfig("ngram", 4, prompt_lookup_max=3)
    hash(cfg)
    draft = EngineConfig(speculative_config={"method": "draft_model", "model": "m", "num_speculative_tokens": 2})
    assert draft.speculative_config.model == "m"
    for bad, match in [({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "typical_acceptance": 1}, "not supported"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "model": "m"}, "applies to method"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
                       ("{not json", "JSON object")]:
        with pytest.raises(ValueError, match=match):
            EngineConfig(speculative_config=bad)


def test_a_draft_with_another_tokenizer_is_refused():
    from jpaged.engine.spec_decode.draft_model import check_tokenizers
    from tests.engine.conftest import ByteTokenizer

    class Shifted(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [(t + 1) % 256 for t in super().encode(text)]

    check_tokenizers(ByteTokenizer(), ByteTokenizer(), 256, 256)
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_tokenizers(ByteTokenizer(), Shifted(), 256, 256)
    with pytest.raises(ValueError, match="vocabulary"):
        check_tokenizers(ByteTokenizer(), ByteTokenizer(), 256, 512)


def target_token(seq: Sequence, position: int) -> int:
    """The fake target's token at `position`: a function of the sequence and position only."""
    return (7 * seq.seq_id + position) % 50 + 1


class SpecFakeModel(FakeModel):
    """Plays the engine with proposals: each decode gets k proposals, right or wrong at random (none
    without `draw`); the target 'samples' target_token at every verified position and the run stops
    at the first mismatch."""

    def __init__(self, sched: Scheduler, draw):
        super().__init__(sched)
        self.draw = draw

    def proposals(self) -> dict[int, list[int]]:
        out = {}
        for seq in self.sched.running if self.draw else ():
            if seq.num_tokens - seq.num_computed_tokens == 1:
                k = self.draw(st.integers(0, 4))
                right = [target_token(seq, seq.num_tokens + i) for i in range(k)]
                out[seq.seq_id] = [t if self.draw(st.booleans()) else 60 + t for t in right]
        return out

    def schedule(self):
        return self.sched.schedule(self.proposals())

    def sampled(self, batch) -> dict[int, list[int]]:
        runs = {}
        for e in batch.entries:
            if not e.num_samples:
                continue
            first = e.start + e.num_tokens - e.num_proposed
            drawn = [target_token(e.seq, first + i) for i in range(e.num_samples)]
            n = verify.accepted_length(e.seq.token_ids[first:first + e.num_proposed], drawn)
            runs[e.seq.seq_id] = drawn[:n + 1]
        return runs

    def step(self):
        batch = super().step()
        self.check_cached_pages()
        return batch

    def check_cached_pages(self) -> None:
        """Every page in the prefix cache holds exactly the tokens it is cached under."""
        cache = self.sched.block_manager.prefix_cache
        for page, entry in cache._entry_of_page.items():
            held = [self.kv.device[page][slot][0] for slot in range(self.sched.page_size)]
            assert held == list(entry.token_ids), f"cached page {page} holds {held}, cached as {entry.token_ids}"


def run_fake(seqs, draw=None, num_blocks=20) -> dict[int, list[int]]:
    config = EngineConfig(block_size=PS, max_num_batched_tokens=24, max_num_seqs=4, max_num_prefill_seqs=3)
    sched = Scheduler(config, num_blocks=num_blocks, max_model_len=128)
    for s in seqs:
        sched.add(s)
    model = SpecFakeModel(sched, draw)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        model.step()
    assert not sched.has_unfinished()
    assert sched.num_free_pages == sched.block_manager.num_pages
    return {s.seq_id: s.output_token_ids for s in seqs}


def fake_seqs(prompt_lens, max_tokens):
    shared = list(range(100, 124))  # three full pages: prefix-cache hits for the later prompts
    return [Sequence(i, f"r{i}", (shared + list(range(1, n + 1)))[:max(n, 1)] if i % 2 else list(range(1, n + 1)),
                     SamplingParams(max_tokens=m), arrival_time=float(i))
            for i, (n, m) in enumerate(zip(prompt_lens, max_tokens))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_lens=st.lists(st.integers(1, 40), min_size=1, max_size=6), data=st.data())
def test_verified_runs_give_the_outputs_of_plain_decoding(prompt_lens, data):
    max_tokens = [data.draw(st.integers(1, 20)) for _ in prompt_lens]
    expected = run_fake(fake_seqs(prompt_lens, max_tokens))
    assert run_fake(fake_seqs(prompt_lens, max_tokens), draw=data.draw) == expected


def test_metrics_export_the_acceptance_figures():
    from jpaged.server.metrics import ServerMetrics

    stats = dict(num_running=0, num_waiting=0, num_used_pages=0, num_free_pages=8, num_total_pages=8,
                 prefix_cache_hits=0, prefix_cache_queries=0, prompt_tokens=0, generation_tokens=0,
                 num_preemptions=0, spec_proposed_tokens=40, spec_accepted_tokens=30, spec_verify_steps=10)
    text = ServerMetrics(lambda: stats, lambda: 0).render().decode()
    assert "jpaged_spec_decode_accepted_tokens_total 30.0" in text
    assert "jpaged_spec_decode_mean_accepted_length 4.0" in text
    del stats["spec_verify_steps"], stats["spec_accepted_tokens"], stats["spec_proposed_tokens"]
    assert "spec_decode" not in ServerMetrics(lambda: stats, lambda: 0).render().decode()
