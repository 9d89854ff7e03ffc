"""Beam search through fork and copy-on-write equals a plain beam search over HF transformers' logits."""
import numpy as np
import torch

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.sampling_params import SamplingParams


def hf_beam_search(hf, prompt, width, steps):
    """Textbook beam search (no EOS): each beam offers its top 2W tokens, the best W continue."""
    beams = [([], 0.0)]
    for _ in range(steps):
        cands = []
        for out, cum in beams:
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + out])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1).numpy()
            for tok in np.argsort(-lp, kind="stable")[:2 * width]:
                cands.append((cum + lp[tok], out + [int(tok)]))
        cands.sort(key=lambda c: -c[0])
        beams = [(out, cum) for cum, out in cands[:width]]
    return beams


def test_beam_search_equals_reference_and_shares_pages(tiny_llama, byte_tokenizer):
    hf, model = tiny_llama
    prompt = list(range(10, 10 + 37))
    width, steps = 3, 6
    expected = hf_beam_search(hf, prompt, width, steps)
    engine = Engine(EngineConfig(model="test", dtype="float32", num_kv_blocks=64, max_model_len=256,
                                 max_num_batched_tokens=64), model=model, tokenizer=byte_tokenizer)
    engine.add_request("b", prompt, SamplingParams(n=width, use_beam_search=True, beam_width=width,
                                                   temperature=0.0, max_tokens=steps, ignore_eos=True))
    shared_seen = False
    result = None
    while engine.has_unfinished():
        for out in engine.step():
            result = out
        beams = [s for s in engine.scheduler.running if s.request_id == "b"]
        if len(beams) > 1:
            shared_seen |= engine.scheduler.block_manager.ref_count(beams[0].block_table[0]) == len(beams)
    assert result.finished
    assert [c.token_ids for c in result.outputs] == [out for out, _ in expected]
    np.testing.assert_allclose([c.cumulative_logprob for c in result.outputs], [cum for _, cum in expected],
                               atol=1e-4)
    assert shared_seen
    assert engine.stats()["num_used_pages"] == 0


def test_beam_width_one_is_greedy(tiny_llama, byte_tokenizer):
    _, model = tiny_llama
    engine = Engine(EngineConfig(model="test", dtype="float32", num_kv_blocks=64, max_model_len=256,
                                 max_num_batched_tokens=64), model=model, tokenizer=byte_tokenizer)
    prompt = [5, 9, 13, 200]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    beam = SamplingParams(use_beam_search=True, beam_width=1, temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("g", prompt, greedy)
    engine.add_request("b", prompt, beam)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert done["b"].outputs[0].token_ids == done["g"].outputs[0].token_ids
