"""Shared pieces of the end-to-end benchmarks: the model built on the device, the engine, the
copy-bandwidth ceiling, timers, the device/version record and the JSON file.

Every benchmark builds a random-weight model of a `configs/` preset directly on the device (each
parameter drawn by its own jitted function, in the model's dtype, so no float32 or host copy of an
8B model ever exists), drives it through `jpaged.LLM`'s engine with random token-id prompts, and
writes one JSON file holding the device, versions, model shape, workload, figures, the baselines
measured in the same run and the command that produced it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
RESULTS = REPO / "bench" / "results"


def prepare_memory(with_torch: bool) -> None:
    """Before JAX touches the device: when torch shares the process, JAX must not grab 75% of it; alone,
    it takes 95% (the default 75% leaves the 8B run's KV pool ~370 sequences of 768 tokens, not 512)."""
    if with_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


# -- model --------------------------------------------------------------------------------------

def model_config(name: str):
    """A `configs/<name>.json` preset, or a path to an HF config.json."""
    from models import ModelConfig

    path = pathlib.Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json"
    if not path.is_file():
        presets = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise ValueError(f"--model must be a preset ({', '.join(presets)}) or a config.json path, got {name!r}")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def random_model(cfg, dtype_name: str = "bfloat16", seed: int = 0):
    """LlamaForCausalLM with N(0, 0.02) weights and unit norms, drawn on the device directly in
    `dtype_name`: nothing passes through the host. One small jitted draw per distinct parameter shape
    (a handful), not one program over all of them: that one took 100 s to compile for Llama-3-8B."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models import model_class

    dtype = jnp.dtype(dtype_name)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=dtype)))
    key = jax.random.key(seed, impl="rbg")  # rbg: quicker to draw than threefry
    values = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        if str(path[-2]).endswith("norm"):
            value = jnp.ones(var.shape, var.dtype)
        else:
            value = _normal(jax.random.fold_in(key, i), var.shape, var.dtype)
        values.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _normal(key, shape, dtype):
    return _normal_jit()(key, shape, dtype)


@functools.cache
def _normal_jit():
    import jax  # imported late: prepare_memory() sets XLA's memory flags before jax starts
    import jax.numpy as jnp

    return jax.jit(lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype),
                   static_argnums=(1, 2))


def model_shape(cfg, dtype_name: str) -> dict:
    return dict(architecture=cfg.architecture, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_word_embeddings, num_params=cfg.num_params(), dtype=dtype_name)


def weight_bytes(model) -> int:
    import jax
    from flax import nnx

    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def weight_bytes_read_per_step(model, num_seqs: int) -> int:
    """Weights a decode step must read: all of them, except that an untied embedding table is only
    read at the step's `num_seqs` rows."""
    cfg = model.config
    total = weight_bytes(model)
    if cfg.tie_word_embeddings:
        return total
    row = cfg.hidden_size * model.embed_tokens.embedding[...].dtype.itemsize
    return total - cfg.vocab_size * row + num_seqs * row


def kv_bytes_per_token(cfg, dtype_name: str) -> int:
    """K and V of one token in every layer."""
    import jax.numpy as jnp

    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype_name).itemsize


class IdTokenizer:
    """Stands in for a tokenizer when prompts are token ids: decoding is one letter per id."""

    eos_token_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 26 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


def make_llm(model, dtype_name: str, *, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
             enable_prefix_caching: bool = True, block_size: int = 16, backend: str = "auto",
             num_kv_blocks: int | None = None, **engine_args):
    """jpaged.LLM over an already-built model, prompts given as token ids; engine_args: more EngineConfig fields."""
    from jpaged.llm import LLM

    return LLM(model="random", model_obj=model, tokenizer=IdTokenizer(), dtype=dtype_name,
               block_size=block_size, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
               enable_prefix_caching=enable_prefix_caching, num_kv_blocks=num_kv_blocks, backend=backend,
               **engine_args)


def engine_kwargs(args, max_model_len: int, **overrides) -> dict:
    """make_llm keyword arguments from the shared engine flags (--no-mixed-split and --no-fused-swiglu
    folded into the backend override; --max-num-prefill-seqs 0 = no cap)."""
    return dict(max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                backend=backend_override(args), max_num_prefill_seqs=args.max_num_prefill_seqs or None) | overrides


def backend_override(args) -> str:
    """The --backend text with the A/B switches --no-mixed-split and --no-fused-swiglu appended as fields."""
    text = args.backend
    if getattr(args, "no_mixed_split", False):
        text += ",split_mixed=false"
    if getattr(args, "no_fused_swiglu", False):
        text += ",gate_up=xla"
    return text


def random_prompts(rng, lengths: Sequence[int], vocab_size: int) -> list[list[int]]:
    return [rng.integers(0, vocab_size, size=int(n)).tolist() for n in lengths]


def timed_generate(llm, prompts, output_lens: Sequence[int]) -> dict:
    """Runs prompts to completion (greedy, EOS ignored); wall time, token counts, TTFTs, compilations."""
    from jpaged.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True) for n in output_lens]
    compiled = llm.engine.runner.num_compilations
    stats = llm.engine.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if generated != sum(int(n) for n in output_lens):
        raise RuntimeError(f"engine produced {generated} tokens, {sum(output_lens)} were asked for")
    return dict(
        seconds=seconds, num_requests=len(prompts), input_tokens=sum(len(p) for p in prompts),
        output_tokens=generated, ttft_s=[o.first_token_time - o.arrival_time for o in outputs],
        compilations=llm.engine.runner.num_compilations - compiled,
        **{k: after[k] - stats[k] for k in ("num_steps", "num_preemptions", "prefix_cache_queries",
                                            "prefix_cache_hits")})


# -- measurement --------------------------------------------------------------------------------

def copy_bandwidth(nbytes: int | None = None, reps: int = 20, device=None, warmup_s: float = 0.3) -> float:
    """(read + written bytes) / median time of a large copy on `device` (default the first): the ceiling
    MBU is against. Copies run for `warmup_s` before any is timed, because a GPU that was idle (as at
    a benchmark's start) runs at low clocks for a while; then `reps` copies are timed one by one.

    The best of two copies: XLA's (`a + 1`, which it cannot elide) and, where PyTorch sees a GPU,
    `torch.Tensor.copy_` (a driver memcpy). On the H100 XLA's reads+writes at 2.5-2.7 TB/s and
    PyTorch's at ~3.0: MBU against the slower would flatter every figure by ~15 %."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = device or jax.devices()[0]
    if nbytes is None:
        nbytes = (2 << 30) if device.platform == "gpu" else (64 << 20)
    x = jnp.zeros((nbytes // 4,), jnp.float32, device=device)
    copy = jax.jit(lambda a: a + 1)  # a copy that XLA cannot elide
    copy(x).block_until_ready()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        copy(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    best = 2 * nbytes / float(np.median(times))
    if device.platform == "gpu":
        best = max(best, _torch_copy_bandwidth(nbytes, reps, device.local_hardware_id or 0, warmup_s) or 0.0)
    return best


def _torch_copy_bandwidth(nbytes: int, reps: int, index: int, warmup_s: float) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    dev = torch.device("cuda", index)
    try:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
    except torch.OutOfMemoryError:  # JAX preallocated the device: XLA's copy alone gives the ceiling
        torch.cuda.empty_cache()
        return None
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        dst.copy_(src)
        torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


_ABSENT = object()


@dataclasses.dataclass
class StepRecord:
    seconds: float
    num_tokens: int    # tokens computed in the step (prefill chunks + decodes)
    num_entries: int   # sequences in the step
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def is_decode(self) -> bool:
        return self.num_entries > 0 and self.num_tokens == self.num_entries


class StepRecorder:
    """Records every Engine.step (wall time, batch shape) by wrapping the instance's methods; the
    engine's files are untouched and `close()` restores them. Subclasses time more phases."""

    def __init__(self, engine):
        self.engine = engine
        self.records: list[StepRecord] = []
        self._saved: list[tuple[object, str, object]] = []
        self._current: StepRecord | None = None
        self._patch(engine, "step", self._timed_step)
        self._patch(engine.scheduler, "schedule", self._timed_schedule)

    def _patch(self, obj, name: str, make) -> None:
        """Replaces obj.name by make(obj.name) until close(); obj may be an instance, a class or a dict
        (then obj[name]: the runner's device calls, `ModelRunner.calls`)."""
        if isinstance(obj, dict):
            self._saved.append((obj, name, obj[name]))
            obj[name] = make(obj[name])
            return
        self._saved.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, make(getattr(obj, name)))

    def close(self) -> None:
        for obj, name, original in reversed(self._saved):
            if isinstance(obj, dict):
                obj[name] = original
            elif original is _ABSENT:
                delattr(obj, name)  # an instance attribute shadowing the class's method
            else:
                setattr(obj, name, original)
        self._saved.clear()

    def phase(self, name: str, seconds: float) -> None:
        if self._current is not None:
            self._current.phases[name] = self._current.phases.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase(name, time.perf_counter() - start)
        return wrapper

    def _timed_step(self, step):
        @functools.wraps(step)
        def wrapper():
            self._current = StepRecord(0.0, 0, 0)
            start = time.perf_counter()
            out = step()
            self._current.seconds = time.perf_counter() - start
            self.records.append(self._current)
            self._current = None
            return out
        return wrapper

    def _timed_schedule(self, schedule):
        timed = self.timed("schedule", schedule)

        @functools.wraps(schedule)
        def wrapper(*args, **kwargs):
            batch = timed(*args, **kwargs)
            self._current.num_tokens = batch.num_tokens
            self._current.num_entries = len(batch.entries)
            return batch
        return wrapper

    def decode_steps(self, num_seqs: int) -> list[StepRecord]:
        """Steps in which exactly `num_seqs` sequences each decoded one token."""
        return [r for r in self.records if r.is_decode and r.num_entries == num_seqs]


# -- record -------------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return dict(platform=dev.platform, device_kind=dev.device_kind, num_devices=jax.device_count(),
                jax=jax.__version__, jaxlib=_version("jaxlib"), flax=_version("flax"),
                python=platform.python_version(), host=platform.node())


def device_slug() -> str:
    """'nvidia-h100-80gb-hbm3', 'cpu': the device part of a default result file name."""
    import jax

    dev = jax.devices()[0]
    return slug("cpu" if dev.platform == "cpu" else dev.device_kind)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(name: str) -> pathlib.Path:
    return RESULTS / f"{name}_{device_slug()}.json"


def command_line(argv: Sequence[str] | None, script: str) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", f"bench.{script}", *args])


def write_json(result: dict, out: str | os.PathLike | None, name: str) -> pathlib.Path:
    path = pathlib.Path(out) if out else default_out(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def print_table(title: str, rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for key, value in rows:
        text = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def add_backend_flag(parser, default: str = "auto") -> None:
    """--backend (alias --attn-impl, so one command line runs old and new trees): 'auto' or a
    pallas_kernels.select_backend override such as 'mosaic,split_mixed=false'."""
    parser.add_argument("--backend", "--attn-impl", dest="backend", default=default,
                        help="'auto' or a preset (reference, pallas, interpret, mosaic) with optional field=value "
                             "overrides, e.g. 'mosaic,split_mixed=false' (pallas_kernels/backend.py)")


def add_engine_flags(parser, *, max_num_seqs: int, max_num_batched_tokens: int = 2048) -> None:
    """Flags every engine benchmark shares."""
    parser.add_argument("--model", default="llama3-8b", help="configs/ preset or config.json path")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    add_backend_flag(parser)
    parser.add_argument("--no-mixed-split", action="store_true",
                        help="A/B: the Mosaic prefill kernel also takes a mixed batch's decodes "
                             "(Backend.split_mixed=false)")
    parser.add_argument("--no-fused-swiglu", action="store_true",
                        help="A/B: the MLP's gate/up GEMM in XLA, then the SwiGLU as its own fusion "
                             "(Backend.gate_up=xla)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    from jpaged.config import EngineConfig

    parser.add_argument("--max-num-prefill-seqs", type=int, default=EngineConfig.max_num_prefill_seqs,
                        help="prefill chunks per step (EngineConfig.max_num_prefill_seqs; 0: no cap)")
    parser.add_argument("--out", help="JSON path (default bench/results/<name>_<device>.json)")
