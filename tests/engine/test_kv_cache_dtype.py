"""The engine and jpaged.generate with 8-bit KV pages: the scales travel with their pages (copy-on-write
forks, swap, prefix-cache hits), so greedy output with an fp8 cache is the same with preemption and prefix
caching as without them; and the pool holds about twice the pages."""
import numpy as np
import pytest

from jpaged.config import EngineConfig
from jpaged.engine.llm_engine import Engine
from jpaged.sampling_params import SamplingParams
from tests.engine.test_engine import run_engine

NEW_TOKENS = 6


def _prompts():
    rng = np.random.RandomState(3)
    shared = rng.randint(3, 256, size=40).tolist()
    lengths = [1, 37, 40, 60, 33, 55]
    return [(shared + rng.randint(3, 256, size=n).tolist()) if i % 2 else rng.randint(3, 256, size=n).tolist()
            for i, n in enumerate(lengths)]


def _engine(model, tokenizer, **kw):
    # Few shapes (token buckets 4, 16; page buckets 4, 8), so each engine compiles its step 4 times.
    cfg = dict(model="test", dtype="float32", block_size=16, max_num_seqs=8, max_num_batched_tokens=16,
               max_model_len=128, num_kv_blocks=64, kv_cache_dtype="fp8", max_num_prefill_seqs=2)
    return Engine(EngineConfig(**(cfg | kw)), model=model, tokenizer=tokenizer)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_fp8(tiny_llama, byte_tokenizer_module):
    """Greedy tokens of the fp8 engine with a pool big enough for all, no prefix caching."""
    _, model = tiny_llama
    engine = _engine(model, byte_tokenizer_module, enable_prefix_caching=False)
    assert engine.runner.kv_cache.quantized and engine.runner.kv_cache.k[0].dtype.itemsize == 1
    outs = run_engine(engine, _prompts(), GREEDY)
    assert engine.stats()["num_preemptions"] == 0
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def byte_tokenizer_module():
    from tests.engine.conftest import ByteTokenizer
    return ByteTokenizer()


def _preempted(model, tokenizer, mode):
    # 8 pages hold 128 tokens: far less than the prompts' two samples need at once, so sequences get
    # preempted; n=2 forks each prompt (its partial last page is copied on write).
    engine = _engine(model, tokenizer, num_kv_blocks=8, preemption_mode=mode,
                     num_host_kv_blocks=16 if mode == "swap" else 0)
    outs = run_engine(engine, _prompts(), SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                         ignore_eos=True, n=2))
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["num_used_pages"] == 0
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_fp8_cache_greedy_is_unchanged_by_forks_swap_preemption_and_prefix_caching(
        tiny_llama, byte_tokenizer_module, plain_fp8):
    _, model = tiny_llama
    assert _preempted(model, byte_tokenizer_module, "swap") == [[want, want] for want in plain_fp8]


@pytest.mark.long
def test_fp8_cache_greedy_is_unchanged_by_recompute_preemption(tiny_llama, byte_tokenizer_module, plain_fp8):
    _, model = tiny_llama
    assert _preempted(model, byte_tokenizer_module, "recompute") == [[want, want] for want in plain_fp8]


def test_8bit_pool_holds_about_twice_the_pages(tiny_llama):
    """The engine sizes its pool as memory // bytes_per_page, which counts the 8-bit pages and their scales."""
    from jpaged.engine.llm_engine import CPU_KV_CACHE_BYTES
    from jpaged.engine.model_runner import serving_spec

    _, model = tiny_llama
    pages = {d: CPU_KV_CACHE_BYTES // serving_spec(model, EngineConfig(kv_cache_dtype=d)).bytes_per_page
             for d in ("bfloat16", "fp8", "int8", "fp8_e5m2")}
    # 2 D bytes of bf16 against D + 4 (the scale) per token and kv head: 1.6x at D = 16, 1.94x at D = 128
    d = model.config.head_dim
    assert pages["fp8"] == pages["int8"] == pages["fp8_e5m2"]
    assert pages["fp8"] / pages["bfloat16"] == pytest.approx(2 * d / (d + 4), rel=1e-3)


def test_bad_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp4")


def test_generate_with_an_fp8_pool_equals_the_engine(tiny_llama, plain_fp8):
    import jax
    import jax.numpy as jnp

    from jpaged.generate import generate

    _, model = tiny_llama
    prompts = _prompts()[:3]
    width = max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    out = generate(model, tokens, lens, max_new_tokens=NEW_TOKENS, key=jax.random.PRNGKey(0), num_samples=2,
                   page_size=16, kv_cache_dtype="fp8")
    got = np.asarray(out.tokens)
    for b, want in enumerate(plain_fp8[:3]):
        assert got[b, 0].tolist() == want and got[b, 1].tolist() == want
