"""Multi-LoRA under tensor parallelism (virtual CPU devices): A/B split as their base weights, kv heads
repeated as the model's, and greedy output still equal to the merged weights."""
import pytest

from tests.multihost.devices import on_cpu_devices


@pytest.mark.slow
@pytest.mark.long  # a child process with 4 CPU devices: imports and compiles on its own (~40 s loaded)
@on_cpu_devices(4)
def test_lora_under_tensor_parallelism_equals_merged_weights():
    import copy
    import tempfile

    from jpaged.config import EngineConfig
    from jpaged.engine.llm_engine import Engine
    from jpaged.lora import LoRARequest
    from jpaged.sampling_params import SamplingParams
    from tests.engine.conftest import ByteTokenizer
    from tests.hf_reference import hf_greedy, jpaged_from_hf, tiny_hf_model
    from tests.lora.helpers import merged_hf_state, write_adapter

    hf = tiny_hf_model("llama3", seed=7)  # 4 q heads, 2 kv heads: TP 4 repeats kv heads
    config = jpaged_from_hf(hf).config
    root = tempfile.mkdtemp()
    loras = [LoRARequest(f"a{i}", i, write_adapter(f"{root}/a{i}", config, rank=r, seed=i))
             for i, r in ((1, 8), (2, 16))]
    prompt = list(range(5, 30))
    expected = []
    for lora in (None, *loras):
        merged = copy.deepcopy(hf)
        if lora is not None:
            merged.load_state_dict(merged_hf_state(hf.state_dict(), lora.lora_path))
        expected.append(hf_greedy(merged, prompt, 6))
    engine = Engine(EngineConfig(model="test", dtype="float32", num_kv_blocks=32, max_model_len=64,
                                 max_num_batched_tokens=64, tensor_parallel_size=4, enable_lora=True,
                                 max_loras=2, max_lora_rank=16),
                    model=jpaged_from_hf(hf), tokenizer=ByteTokenizer())
    for i, lora in enumerate((None, *loras)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                           lora_request=lora)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert [done[str(i)].outputs[0].token_ids for i in range(3)] == expected
    a, b = engine.lora.weights[0]["q_proj"]
    assert b.sharding.spec[2] == "model" and not any(a.sharding.spec)
    a, b = engine.lora.weights[0]["o_proj"]
    assert a.sharding.spec[0] == "model"
