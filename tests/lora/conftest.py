"""Fixtures of the LoRA tests: the tiny Llama and four random adapters of different ranks and targets."""
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.lora import LoRARequest
from tests.engine.conftest import ByteTokenizer, tiny_llama  # noqa: F401  (the fixture)
from tests.hf_reference import hf_greedy, jpaged_from_hf
from tests.lora.helpers import merged_hf_state, write_adapter

NEW_TOKENS = 6
PROMPT = list(range(5, 25))  # two full pages and a part: the prefix cache would hand them across adapters

# (rank, alpha, rsLoRA, targets): padded ranks, both scalings, an adapter of two targets only.
ADAPTERS = [(8, 16.0, False, None), (16, 32.0, True, None), (4, 8.0, False, ("q_proj", "v_proj")),
            (16, 16.0, False, ("o_proj", "gate_proj", "up_proj", "down_proj")), (8, 8.0, False, None)]
MAX_LORAS = 4  # one fewer than ADAPTERS: all of them at once must evict


@pytest.fixture(scope="session")
def lora_requests(tiny_llama, tmp_path_factory):
    """One LoRARequest per ADAPTERS entry, named a1, a2, ... with ids 1, 2, ..., written for the tiny Llama."""
    _, model = tiny_llama
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i, (rank, alpha, rslora, targets) in enumerate(ADAPTERS, start=1):
        kw = {} if targets is None else {"targets": targets}
        path = write_adapter(str(root / f"a{i}"), model.config, rank=rank, alpha=alpha, use_rslora=rslora,
                             seed=i, **kw)
        out.append(LoRARequest(f"a{i}", i, path))
    return out


@pytest.fixture(scope="session")
def lora_engine(tiny_llama, lora_requests) -> Engine:
    """One engine with LoRA on for every test (each engine compiles its step shapes, and compiling is
    most of these tests' time), over a copy of the tiny model, with few step shapes, every adapter registered."""
    cfg = EngineConfig(model="test", dtype="float32", block_size=8, max_num_seqs=8, max_num_batched_tokens=16,
                       max_model_len=32, num_kv_blocks=64, enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=16)
    engine = Engine(cfg, model=jpaged_from_hf(tiny_llama[0]), tokenizer=ByteTokenizer())
    for request in lora_requests:
        engine.add_lora(request)
    return engine


@pytest.fixture(scope="session")
def merged_greedy(tiny_llama, lora_requests):
    """HF greedy of PROMPT with each adapter merged into the weights (W + scale B A); index 0: the base model."""
    import copy
    hf, _ = tiny_llama
    out = [hf_greedy(hf, PROMPT, NEW_TOKENS)]
    for req in lora_requests:
        merged = copy.deepcopy(hf)
        merged.load_state_dict(merged_hf_state(hf.state_dict(), req.lora_path))
        out.append(hf_greedy(merged, PROMPT, NEW_TOKENS))
    assert len({tuple(o) for o in out}) == len(out), "every adapter must change the greedy output"
    return out
