"""EngineConfig: every knob of the engine in one frozen, validated dataclass.

Each field's `metadata` holds its command-line help (and choices where there are few), so the
`jpaged` flags are generated from the fields (jpaged/cli.py) and no default is written twice.
"""
from __future__ import annotations

import dataclasses

DTYPES = ("bfloat16", "float32")  # parameter dtypes the loader builds; "auto" resolves to one of them
BLOCK_SIZES = (8, 16, 32, 64)


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """'auto': bfloat16 on a GPU, float32 elsewhere (`platform` default: JAX's default backend)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    if platform is None:
        import jax
        platform = jax.default_backend()
    return "bfloat16" if platform == "gpu" else "float32"


def _knob(default, help: str, *, choices: tuple | None = None, aliases: tuple[str, ...] = ()):
    """A field with its command-line help, choices and extra flag names (jpaged/cli.py builds the flags)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = _knob("default", "'default' (SmolLM2-135M-Instruct), an HF dir, a .gguf file, a converted "
                       "checkpoint dir or a preset name")
    dtype: str = _knob("auto", "parameter dtype; 'auto': bfloat16 on a GPU, float32 on CPU",
                       choices=("auto", *DTYPES))
    block_size: int = _knob(16, "tokens per KV page", choices=BLOCK_SIZES)
    max_num_seqs: int = _knob(256, "most sequences in one step")
    max_num_batched_tokens: int = _knob(2048, "token budget of one step")
    max_num_prefill_seqs: int | None = _knob(
        32, "most sequences with more than one new token (prefill chunks) in one step; sizes the Mosaic "
        "prefill kernel's work list")
    max_model_len: int | None = _knob(None, "longest prompt + completion (default: the model's context length)")
    enable_prefix_caching: bool = _knob(True, "reuse the KV pages of shared prompt prefixes")
    enable_chunked_prefill: bool = _knob(True, "split long prompts over steps so decodes never wait")
    num_kv_blocks: int | None = _knob(None, "KV pages in the pool (default: sized from free device memory, "
                                      "or a fixed pool on CPU)")
    kv_cache_memory_fraction: float = _knob(0.85, "share of free device memory (after the weights) for the "
                                            "KV pool when num_kv_blocks is not given")
    num_host_kv_blocks: int = _knob(0, "host pages for swap preemption")
    preemption_mode: str = _knob("recompute", "what a preempted sequence loses: its pages (recompute) or "
                                 "nothing (swap to host pages)", choices=("recompute", "swap"))
    scheduling_policy: str = _knob("fcfs", "order of admission: arrival, or (priority, arrival)",
                                   choices=("fcfs", "priority"))
    tensor_parallel_size: int = _knob(1, "devices to shard the model over")
    data_parallel_size: int = _knob(1, "model replicas, each on tensor_parallel_size devices of its own")
    backend: str = _knob("auto", "kernels: 'auto' (the device's preset), a preset ('reference', 'pallas', "
                         "'interpret', 'mosaic') or a preset with field overrides, e.g. 'mosaic,split_mixed=false'",
                         aliases=("--attn-impl",))
    async_scheduling: bool = _knob(True, "schedule step N+1 while step N runs")
    fuse_projections: bool = _knob(True, "fuse q/k/v and gate/up into one GEMM each (one device)")
    seed: int = _knob(0, "engine seed for requests without a seed of their own")
    # -- tiered KV cache (jpaged/engine/kv_tiers.py): host and disk tiers of prefix-cached pages --
    kv_host_cache_gb: float = _knob(0.0, "host RAM (GiB) for cached KV pages evicted from the device, found "
                                    "again by prefix lookup (0: no host tier)")
    kv_disk_cache_dir: str | None = _knob(None, "directory of the disk tier: pages dropped by the host tier, "
                                          "found again by later processes on the same model (needs a host tier)")
    kv_disk_cache_gb: float = _knob(16.0, "most disk space (GiB) the disk tier takes")

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        check(self.dtype == "auto" or self.dtype in DTYPES,
              f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.block_size in BLOCK_SIZES, f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        check(self.max_num_batched_tokens >= self.max_num_seqs or self.max_num_batched_tokens >= 16,
              f"max_num_batched_tokens must be >= 16, got {self.max_num_batched_tokens}")
        check(self.max_num_prefill_seqs is None or self.max_num_prefill_seqs >= 1,
              f"max_num_prefill_seqs must be >= 1 or None, got {self.max_num_prefill_seqs}")
        check(self.max_model_len is None or self.max_model_len >= 1,
              f"max_model_len must be >= 1 or None, got {self.max_model_len}")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
              f"num_kv_blocks must be >= 1 or None, got {self.num_kv_blocks}")
        check(0.0 < self.kv_cache_memory_fraction <= 1.0,
              f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        check(self.num_host_kv_blocks >= 0, f"num_host_kv_blocks must be >= 0, got {self.num_host_kv_blocks}")
        check(self.preemption_mode in ("recompute", "swap"),
              f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        check(self.preemption_mode != "swap" or self.num_host_kv_blocks > 0,
              "preemption_mode='swap' needs num_host_kv_blocks > 0")
        check(self.scheduling_policy in ("fcfs", "priority"),
              f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check(self.data_parallel_size >= 1, f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        check(self.kv_host_cache_gb >= 0, f"kv_host_cache_gb must be >= 0, got {self.kv_host_cache_gb}")
        check(self.kv_host_cache_gb == 0 or self.enable_prefix_caching,
              "kv_host_cache_gb > 0 needs prefix caching (the host tier holds prefix-cached pages)")
        check(self.kv_disk_cache_dir is None or self.kv_host_cache_gb > 0,
              "kv_disk_cache_dir needs a host tier (kv_host_cache_gb > 0): pages reach disk from the host")
        check(self.kv_disk_cache_gb > 0, f"kv_disk_cache_gb must be > 0, got {self.kv_disk_cache_gb}")
