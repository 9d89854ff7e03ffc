"""EngineConfig: every knob of the engine in one frozen, validated dataclass.

Each field's `metadata` holds its command-line help (and choices where there are few), so the
`jpaged` flags are generated from the fields (jpaged/cli.py) and no default is written twice.
"""
from __future__ import annotations

import dataclasses

DTYPES = ("bfloat16", "float32")  # parameter dtypes the loader builds; "auto" resolves to one of them
BLOCK_SIZES = (8, 16, 32, 64)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")  # quantized KV cache
QUANTIZATIONS = ("none", "fp8")                                                        # fp8 weights


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


def _knob(default, help: str, *, choices: tuple | None = None, aliases: tuple[str, ...] = (), nargs: str | None = None):
    """A field with its command-line help, choices, extra flag names and (for a tuple) argparse's nargs
    (jpaged/cli.py builds the flags)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                                        "nargs": nargs})


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
    # -- quantized KV cache and fp8 weights (pallas_kernels/kv_quant.py, models/fp8_linear.py) --
    kv_cache_dtype: str = _knob("auto", "KV page dtype; 'auto': the model dtype; 'fp8' (e4m3), 'fp8_e5m2', "
                                "'int8': 8-bit pages with a float32 scale per token and kv head, about "
                                "twice the pages in the same memory", choices=KV_CACHE_DTYPES)
    quantization: str = _knob("none", "weight quantization: 'fp8' quantizes the linear layers' weights at "
                              "load (per-output-channel scales, activations per token) and runs fp8 GEMMs",
                              choices=QUANTIZATIONS)
    # Multi-LoRA (jpaged/lora/): adapters in device slots, selected per request.
    enable_lora: bool = _knob(False, "serve PEFT LoRA adapters beside the base model",
                              aliases=("--enable-lora",))
    lora_modules: tuple[str, ...] = _knob((), "adapters loaded at start, each NAME=PATH (a PEFT directory); "
                                          "needs --enable-lora", nargs="+")
    max_loras: int = _knob(4, "LoRA adapters resident on the device at once (and the most one step uses)")
    max_lora_rank: int = _knob(16, "highest LoRA rank served; smaller ranks are zero-padded to it")
    # Speculative decoding (jpaged/engine/spec_decode/): a SpeculativeConfig, its dict or its JSON.
    speculative_config: str | dict | None = _knob(
        None, "speculative decoding, a JSON object with vLLM's keys: '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}' or '{\"method\": \"draft_model\", "
        "\"model\": PATH, \"num_speculative_tokens\": 4}' (optional \"draft_num_layers\": N keeps the "
        "draft's first N layers)")
    # Mixture of experts (models/moe.py).
    enable_expert_parallel: bool = _knob(
        False, "MoE models: split the experts over the tensor-parallel devices (all-to-all dispatch) instead "
        "of splitting every expert's width; needs tensor_parallel_size > 1", aliases=("--enable-expert-parallel",))
    # -- prompt logprobs in the scheduled prefill (jpaged/engine/prompt_logprobs.py) --
    max_scored_prompt_tokens: int = _knob(512, "most prompt positions one step scores for prompt logprobs "
                                          "(each takes a [vocab] row of float32 logits)")
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
        check(self.kv_cache_dtype in KV_CACHE_DTYPES,
              f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        check(self.quantization in QUANTIZATIONS,
              f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        check(self.quantization == "none" or self.tensor_parallel_size == 1,
              "quantization='fp8' with tensor_parallel_size > 1 is not implemented (fp8 weights run on one device)")
        self._check_lora(check)

    def _check_lora(self, check) -> None:
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        check(all(isinstance(m, str) and "=" in m and m.partition("=")[0] and m.partition("=")[2]
                  for m in self.lora_modules),
              f"lora_modules must be NAME=PATH entries, got {list(self.lora_modules)}")
        check(not self.lora_modules or self.enable_lora, "lora_modules needs enable_lora=True")
        check(self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        check(self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        check(not self.enable_lora or self.data_parallel_size == 1,
              "enable_lora with data_parallel_size > 1 is not implemented")
        from jpaged.engine.spec_decode.config import SpeculativeConfig
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        check(not self.enable_expert_parallel or self.tensor_parallel_size > 1,
              "enable_expert_parallel splits the experts over the tensor-parallel devices: it needs "
              f"tensor_parallel_size > 1, got {self.tensor_parallel_size}")
        check(self.max_scored_prompt_tokens >= 1,
              f"max_scored_prompt_tokens must be >= 1, got {self.max_scored_prompt_tokens}")
        check(self.kv_host_cache_gb >= 0, f"kv_host_cache_gb must be >= 0, got {self.kv_host_cache_gb}")
        check(self.kv_host_cache_gb == 0 or self.enable_prefix_caching,
              "kv_host_cache_gb > 0 needs prefix caching (the host tier holds prefix-cached pages)")
        check(self.kv_disk_cache_dir is None or self.kv_host_cache_gb > 0,
              "kv_disk_cache_dir needs a host tier (kv_host_cache_gb > 0): pages reach disk from the host")
        check(self.kv_disk_cache_gb > 0, f"kv_disk_cache_gb must be > 0, got {self.kv_disk_cache_gb}")
