"""LoRA on the real default model (SmolLM2-135M-Instruct): greedy through random rank-8 and rank-16
adapters, served together, equals HF transformers greedy with each adapter merged into the weights."""
import copy

import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.lora import LoRARequest
from jpaged.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy
from tests.lora.helpers import merged_hf_state, write_adapter

NEW_TOKENS = 8


@pytest.mark.slow
@pytest.mark.long  # the 135M model compiled on CPU with LoRA on every target
def test_lora_on_default_model_equals_merged_weights(smollm2_hf, smollm2_jpaged, tmp_path):
    hf, _ = smollm2_hf
    model, tokenizer = smollm2_jpaged
    prompt = tokenizer.encode("The capital of France is a city where")
    loras = [LoRARequest(f"r{rank}", i, write_adapter(str(tmp_path / f"r{rank}"), model.config, rank=rank,
                                                      alpha=2.0 * rank, seed=i, std=0.08))
             for i, rank in ((1, 8), (2, 16))]
    expected = [hf_greedy(hf, prompt, NEW_TOKENS)]
    for lora in loras:
        merged = copy.deepcopy(hf)
        merged.load_state_dict(merged_hf_state(hf.state_dict(), lora.lora_path))
        expected.append(hf_greedy(merged, prompt, NEW_TOKENS))
    assert len({tuple(e) for e in expected}) == 3, "each adapter must change the greedy output"
    engine = Engine(EngineConfig(model="default", dtype="float32", num_kv_blocks=32, max_model_len=128,
                                 max_num_batched_tokens=64, max_num_seqs=4, enable_lora=True, max_loras=2,
                                 max_lora_rank=16),
                    model=model, tokenizer=tokenizer)
    for i, lora in enumerate((None, *loras)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           lora_request=lora)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert [done[str(i)].outputs[0].token_ids for i in range(3)] == expected
