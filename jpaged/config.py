"""EngineConfig: every knob of the engine in one frozen, validated dataclass."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = "default"
    dtype: str = "bfloat16"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_num_prefill_seqs: int | None = 32   # most sequences with > 1 new token in a step (None: no cap); the
                                            # Mosaic prefill kernel's work list is sized by it
    max_model_len: int | None = None        # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None        # None: sized from device memory (or a CPU default)
    kv_cache_memory_fraction: float = 0.85  # of free device memory after weights, when sizing the pool
    num_host_kv_blocks: int = 0             # host pages for swap preemption
    preemption_mode: str = "recompute"      # "recompute" | "swap"
    scheduling_policy: str = "fcfs"         # "fcfs" | "priority"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    backend: str = "auto"                   # kernels: "auto" (the device's preset) or a pallas_kernels.select_backend override, e.g. "mosaic,decode=mosaic"
    async_scheduling: bool = True           # schedule step N+1 while step N runs (Engine.step)
    fuse_projections: bool = True           # one device: q/k/v and gate/up as one GEMM each (in place)
    seed: int = 0

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        check(self.dtype in ("bfloat16", "float32", "float16"),
              f"dtype must be bfloat16, float32 or float16, got {self.dtype!r}")
        check(self.block_size in (8, 16, 32, 64), f"block_size must be 8, 16, 32 or 64, got {self.block_size}")
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
