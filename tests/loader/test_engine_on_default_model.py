"""The engine on the real default model (SmolLM2-135M-Instruct) equals HF transformers greedy, token for
token, for a batch of 32 prompts of 1..1000 tokens, with preemption, chunked prefill and prefix caching."""

import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from those used for wine. "
        "Books became cheaper, literacy spread across Europe, and ideas travelled faster than ever before. ")
NEW_TOKENS = 8


@pytest.mark.slow
@pytest.mark.long  # ~5 min on 2 cores (the jnp reference attention over 1,000-token contexts)
def test_engine_batch_equals_hf_greedy_on_default_model(smollm2_hf, smollm2_jpaged):
    hf, _ = smollm2_hf
    model, tokenizer = smollm2_jpaged
    ids = tokenizer.encode(TEXT * 30)
    rng = np.random.RandomState(0)
    lengths = [1, 2, 15, 16, 17, 1000] + rng.randint(1, 1000, size=26).tolist()
    # Half the prompts start at the text's beginning (shared prefixes: cache hits), half elsewhere.
    starts = [0 if i % 2 else int(rng.randint(0, 200)) for i in range(len(lengths))]
    prompts = [ids[s:s + n] for s, n in zip(starts, lengths)]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    engine = Engine(EngineConfig(model="default", dtype="float32", num_kv_blocks=160, max_model_len=1024,
                                 max_num_batched_tokens=512, max_num_seqs=32),
                    model=model, tokenizer=tokenizer)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert [done[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["num_free_pages"] == 160
