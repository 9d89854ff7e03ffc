"""Fixtures of the LoRA tests: the tiny Llama and four random adapters of different ranks and targets."""
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.lora import LoRARequest
from tests.engine.conftest import ByteTokenizer, tiny_llama  # noqa: F401  (the fixture)
from tests.hf_reference import jpaged_from_hf
from tests.lora.helpers import write_adapter

# (rank, alpha, rsLoRA, targets): padded ranks, both scalings, an adapter of two targets only.
ADAPTERS = [(8, 16.0, False, None), (16, 32.0, True, None), (4, 8.0, False, ("q_proj", "v_proj")),
            (16, 16.0, False, ("o_proj", "gate_proj", "up_proj", "down_proj"))]


@pytest.fixture(scope="session")
def lora_requests(tiny_llama, tmp_path_factory):
    """One LoRARequest per ADAPTERS entry, ids 1..4, written for the tiny Llama."""
    _, model = tiny_llama
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i, (rank, alpha, rslora, targets) in enumerate(ADAPTERS, start=1):
        kw = {} if targets is None else {"targets": targets}
        path = write_adapter(str(root / f"a{i}"), model.config, rank=rank, alpha=alpha, use_rslora=rslora,
                             seed=i, **kw)
        out.append(LoRARequest(f"a{i}", i, path))
    return out


def lora_engine(hf_model, **kw) -> Engine:
    """An engine with LoRA on over a fresh copy of the tiny model, with few step shapes to compile."""
    cfg = dict(model="test", dtype="float32", block_size=8, max_num_seqs=8, max_num_batched_tokens=16,
               max_model_len=32, num_kv_blocks=64, enable_lora=True, max_loras=4, max_lora_rank=16)
    return Engine(EngineConfig(**(cfg | kw)), model=jpaged_from_hf(hf_model), tokenizer=ByteTokenizer())
