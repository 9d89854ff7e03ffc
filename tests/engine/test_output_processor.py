"""The output processor on synthetic sampler outputs (no model): multi-token runs with stops, EOS and
max_tokens inside them, n > 1 and best_of, logprobs, streaming deltas and final_only reports.

ByteTokenizer (conftest): id i decodes to chr(32 + i % 95), so 33 -> "A", 34 -> "B", 35 -> "C", ...
"""
import dataclasses

import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.output_processor import ForkSample, OutputProcessor, StepResult
from jpaged.engine.scheduler import Scheduler
from jpaged.sampling_params import SamplingParams

EOS = 2
K = 4  # top logprobs per row
A, B, C, D, E = 33, 34, 35, 36, 37
PROMPT = [40, 41, 42, 43, 44, 45]


@dataclasses.dataclass
class Samples:
    tokens: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def make(byte_tokenizer, num_blocks=32, max_model_len=64):
    config = EngineConfig(model="test", block_size=8, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler = Scheduler(config, num_blocks=num_blocks, max_model_len=max_model_len)
    return OutputProcessor(byte_tokenizer, scheduler, eos_token_ids=[EOS], max_model_len=max_model_len)


def step(proc, runs, num_samples=1):
    """One scheduled step whose sampler drew `runs(seq)` (a list of tokens) for each sequence that
    samples, and `runs(fork)` (one token) for each n > 1 sample still to fork. Returns the outputs."""
    batch = proc.scheduler.schedule()
    rows, positions, tokens = [], [], []
    for entry in batch.entries:
        if not entry.num_samples:
            continue
        entry.num_samples = num_samples
        forks = proc.fork_samples(entry.seq)
        for who in (entry.seq, *forks):
            run = runs(who)
            assert 1 <= len(run) <= (num_samples if who is entry.seq else 1)
            for i, token in enumerate(run):
                rows.append(who)
                positions.append(entry.start + entry.num_tokens + i)
                tokens.append(token)
    proc.scheduler.advance(batch)
    r = len(tokens)
    logprobs = -0.1 * (1 + np.arange(r, dtype=np.float32))
    top_ids = (np.asarray(tokens, np.int32)[:, None] + np.arange(K, dtype=np.int32)) % 95
    samples = Samples(np.asarray(tokens, np.int32), logprobs, np.ones(r, np.int32), top_ids,
                      logprobs[:, None] - np.arange(K, dtype=np.float32))
    return proc.process(StepResult(batch, rows, positions, samples))


def run_to_end(proc, runs, num_samples=1):
    outputs = []
    for _ in range(100):
        if not proc.requests:
            return outputs
        outputs += step(proc, runs, num_samples)
    raise AssertionError("the requests never finished")


def fixed(*per_step):
    """Each sequence draws the next run of `per_step` on each step that samples for it."""
    drawn = {}

    def runs(seq):
        i = drawn.get(seq.seq_id, 0)
        drawn[seq.seq_id] = i + 1
        return list(per_step[i])
    return runs


def finished(outputs):
    done = [o for o in outputs if o.finished]
    assert len(done) == 1
    return done[0]


def assert_no_pages_held(proc):
    assert proc.scheduler.num_used_pages == 0 and not proc.scheduler.has_unfinished()


def test_a_multi_token_run_adds_every_token_in_order(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    out = finished(run_to_end(proc, fixed([A, B, C], [D, E, A]), num_samples=3)).outputs[0]
    assert out.token_ids == [A, B, C, D, E, A] and out.text == "ABCDEA"
    assert out.finish_reason == "length"
    assert len(out.logprobs) == 6 and all(A <= next(iter(entry)) <= E for entry in out.logprobs)
    assert out.cumulative_logprob == pytest.approx(-0.1 * (1 + 2 + 3) * 2)
    assert proc.generation_tokens == 6
    assert_no_pages_held(proc)


def test_a_short_run_drops_the_unused_samples_and_the_next_step_computes_its_tokens(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    step(proc, fixed([A]), num_samples=3)
    (seq,) = proc.scheduler.running
    assert seq.output_token_ids == [A]  # no PLACEHOLDER left for the two samples not drawn
    batch = proc.scheduler.schedule()
    assert [(e.start, e.num_tokens) for e in batch.entries] == [(len(PROMPT), 1)]


@pytest.mark.parametrize("params, run, tokens, text, reason, stop_reason", [
    (SamplingParams(max_tokens=10, stop=["BC"]), [A, B, C, D], [A, B, C], "A", "stop", "BC"),
    (SamplingParams(max_tokens=10), [A, EOS, B], [A, EOS], "A", "stop", None),
    (SamplingParams(max_tokens=10, stop_token_ids=[B]), [A, B, C], [A, B], "A", "stop", B),
    (SamplingParams(max_tokens=2, ignore_eos=True), [A, B, C], [A, B], "AB", "length", None),
    (SamplingParams(max_tokens=10, min_tokens=2), [EOS, EOS, A], [EOS, EOS], "" + chr(32 + EOS), "stop", None),
])
def test_a_run_ends_at_its_first_stopping_token(byte_tokenizer, params, run, tokens, text, reason, stop_reason):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, params)
    (seq,) = proc.scheduler.waiting
    out = finished(step(proc, fixed(run), num_samples=len(run))).outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (tokens, text, reason, stop_reason)
    assert seq.output_token_ids == tokens and seq.is_finished  # the tokens after the stop are gone
    assert proc.generation_tokens == len(tokens)
    assert_no_pages_held(proc)


def test_max_model_len_inside_a_run(byte_tokenizer):
    proc = make(byte_tokenizer, max_model_len=len(PROMPT) + 2)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=2, ignore_eos=True))
    out = finished(step(proc, fixed([A, B, C]), num_samples=3)).outputs[0]
    assert out.token_ids == [A, B] and out.finish_reason == "length"


def test_stop_string_across_runs_is_held_back_then_cut(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=10, stop=["CD"]))
    outputs = run_to_end(proc, fixed([A, B, C], [D, E]), num_samples=3)
    assert [o.outputs[0].text for o in outputs] == ["AB", "AB"]  # "C" waits: it may start "CD"
    out = outputs[-1].outputs[0]
    assert out.token_ids == [A, B, C, D] and out.stop_reason == "CD"


def test_streaming_outputs_grow_by_deltas_and_final_only_reports_once(byte_tokenizer):
    texts = {}
    for kind in ("cumulative", "final_only"):
        proc = make(byte_tokenizer)
        proc.add("r", None, PROMPT, SamplingParams(max_tokens=5, ignore_eos=True, output_kind=kind))
        outputs = run_to_end(proc, fixed([A], [B], [C], [D], [E]))
        texts[kind] = [o.outputs[0].text for o in outputs]
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert texts["cumulative"] == ["A", "AB", "ABC", "ABCD", "ABCDE"]
    assert texts["final_only"] == ["ABCDE"]


def test_n_samples_fork_with_their_own_first_tokens(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(n=3, max_tokens=3, ignore_eos=True, seed=5))
    first = iter([A, B, C])

    def runs(who):
        if isinstance(who, ForkSample) or who.num_output_tokens == 0:
            return [next(first)]
        return [who.output_token_ids[0] + 10]

    assert len(step(proc, runs)[0].outputs) == 3
    seeds = {s.sampling_params.seed for s in proc.requests["r"].seqs}
    assert len(seeds) == 3  # each sample draws from its own seed
    outs = finished(run_to_end(proc, runs)).outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert [o.token_ids for o in outs] == [[A, A + 10, A + 10], [B, B + 10, B + 10], [C, C + 10, C + 10]]
    assert_no_pages_held(proc)


def test_best_of_keeps_the_n_most_likely(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(n=1, best_of=3, max_tokens=1, ignore_eos=True))
    # Rows' logprobs fall with the row index (Samples): the parent's row, drawing A, is the likeliest.
    first = iter([A, B, C])
    out = finished(step(proc, lambda who: [next(first)])).outputs
    assert [(o.index, o.token_ids) for o in out] == [(0, [A])]


def test_logprobs_hold_the_sampled_token_and_the_top_k(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=2, ignore_eos=True, logprobs=2))
    out = finished(run_to_end(proc, fixed([A, B]), num_samples=2)).outputs[0]
    assert [sorted(entry) for entry in out.logprobs] == [[A, A + 1], [B, B + 1]]
    assert out.logprobs[1][B].logprob == pytest.approx(-0.2) and out.logprobs[1][B].decoded_token == "B"
    assert out.logprobs[1][B + 1].rank == 2


def test_abort_frees_the_request(byte_tokenizer):
    proc = make(byte_tokenizer)
    proc.add("r", None, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    step(proc, fixed([A]))
    proc.abort("r")
    assert not proc.requests
    assert_no_pages_held(proc)
