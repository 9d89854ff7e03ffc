"""Backend: which kernel runs each device op, chosen once per engine and passed down as data.

A `Backend` is frozen and hashable (a static jit argument): the model, the engine's step, prompt
scoring and `jpaged.generate` all take the same one, so a jit cache key holds it and nothing else
(no module globals, no environment variables) decides a kernel. `select_backend` picks it from the
device, the KV page format and an optional override; the override text is a preset name, optionally
followed by `field=value` pairs (`"mosaic,split_mixed=false"`), so every routing choice stays selectable
from the command line for A/B runs.
"""
from __future__ import annotations

import dataclasses

from pallas_kernels import kv_quant, ragged_paged_attention_mgpu

# field -> the kernels it may name
CHOICES = {
    "kv_write": ("xla", "pallas"),
    "prefill": ("reference", "triton", "mosaic"),
    "decode": ("reference", "triton"),
    "gate_up": ("xla", "mosaic"),
    "lora": ("masked", "ragged"),
    "grouped_gemm": ("xla", "pallas"),
}


@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernel of each op. Values name kernels of this package (`CHOICES`):

    - kv_write: "xla" (an in-place scatter) or "pallas" (`kv_write.write_kv_pallas`).
    - prefill: attention of prefill-shaped batches (T > S): "reference" (jnp), "triton" (the
      Triton-lowered Pallas kernel) or "mosaic" (the Mosaic GPU kernel).
    - decode: attention of decode-shaped batches (T <= S): "reference" or "triton".
    - gate_up: the MLP's gate/up GEMM with SwiGLU: "xla" or "mosaic" (`matmul_mgpu.py`).
    - lora: the batched LoRA matmul of multi-LoRA steps (`lora.lora_delta`): "masked" (dense over
      every slot) or "ragged" (`jax.lax.ragged_dot` over tokens grouped by adapter).
    - grouped_gemm: the MoE experts' grouped GEMMs: "xla" (`jax.lax.ragged_dot`) or "pallas"
      (`grouped_gemm.grouped_gemm_pallas`).
    - split_mixed: with prefill="mosaic", a prefill-shaped batch's single-token sequences go to the
      decode kernel in the same call (`mixed_batch.attend_mixed`).
    - interpret: run the Pallas kernels in Pallas' interpreter (CPU tests).
    A Mosaic kernel that cannot take a call's shapes (its `unsupported_reason`) leaves that call to the
    Triton kernel (or XLA for the GEMM); that fallback is decided at trace time and costs nothing per step.
    """

    kv_write: str = "xla"
    prefill: str = "reference"
    decode: str = "reference"
    gate_up: str = "xla"
    lora: str = "masked"
    grouped_gemm: str = "xla"
    split_mixed: bool = True
    interpret: bool = False

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Backend.{name} must be one of {allowed}, got {value!r}")
        if self.interpret and "mosaic" in (self.prefill, self.gate_up):
            raise ValueError("Backend.interpret runs the Triton-lowered kernels in the interpreter; the Mosaic "
                             "kernels have their own interpreter tests (tests/kernels)")
        if (self.prefill == "reference") != (self.decode == "reference"):
            raise ValueError(f"prefill and decode must both be 'reference' or both be kernels, got "
                             f"prefill={self.prefill!r}, decode={self.decode!r}")

    @property
    def uses_kernels(self) -> bool:
        """Whether attention runs Pallas kernels, which read only each sequence's live pages (the jnp
        reference gathers every page of the page table)."""
        return self.prefill != "reference"

    def describe(self) -> str:
        """The override text that selects this backend (`parse_backend(b.describe()) == b`)."""
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return ",".join(["reference", *fields])


REFERENCE = Backend()
PRESETS = {
    "reference": REFERENCE,
    # Triton-lowered Pallas kernels (GPUs other than Hopper).
    "pallas": Backend(prefill="triton", decode="triton"),
    # The Triton kernels in Pallas' interpreter (CPU).
    "interpret": Backend(prefill="triton", decode="triton", grouped_gemm="pallas", interpret=True),
    # Hopper: Mosaic GPU prefill and GEMM, Triton decode (pallas_kernels/README.md, "Hopper decode: Triton").
    "mosaic": Backend(prefill="mosaic", decode="triton", gate_up="mosaic"),
}


def parse_backend(text: str) -> tuple[str, dict]:
    """(preset or "auto", field overrides) of an override like "mosaic,split_mixed=false" or "auto,kv_write=pallas"."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"backend must be a non-empty string, got {text!r}")
    name, *pairs = [part.strip() for part in text.split(",")]
    if name != "auto" and name not in PRESETS:
        raise ValueError(f"backend must start with 'auto' or a preset {tuple(PRESETS)}, got {name!r}")
    fields = {f.name: f for f in dataclasses.fields(Backend)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"backend override {pair!r} must be field=value with a field of "
                             f"{tuple(fields)}")
        if fields[key].type in ("bool", bool):
            if value not in ("true", "false"):
                raise ValueError(f"backend override {key} must be true or false, got {value!r}")
            overrides[key] = value == "true"
        else:
            overrides[key] = value
    return name, overrides


def default_preset(device) -> str:
    """The preset for `device`: "mosaic" on Hopper (compute capability 9.0), "pallas" on other NVIDIA
    GPUs, "reference" elsewhere."""
    if getattr(device, "platform", None) != "gpu":
        return "reference"
    return "mosaic" if getattr(device, "compute_capability", None) == "9.0" else "pallas"


def page_format_reason(backend: Backend, *, head_dim: int, page_size: int, dtype) -> str | None:
    """Why `backend`'s Mosaic attention kernel cannot serve pages of this format (None when it can)."""
    if backend.prefill != "mosaic":
        return None
    reason = ragged_paged_attention_mgpu.page_format_reason(head_dim=head_dim, page_size=page_size, dtype=dtype)
    return None if reason is None else f"prefill='mosaic': {reason}"


def select_backend(device, spec=None, override: str | Backend | None = None) -> Backend:
    """The backend for `device` and KV pages of `spec` (a `models.kv_cache.KVCacheSpec`, or anything with
    head_dim, page_size and dtype), with `override` ("auto" or None: the device's preset; a preset name
    with optional field=value pairs; or a Backend, taken as it is).

    "auto" on a device whose Mosaic kernels cannot take the page format (fp32 pages, say) falls back
    to the Triton kernels (8-bit pages: Triton prefill, the preset's GEMM kept); an explicit override they cannot take is a ValueError naming the field."""
    if isinstance(override, Backend):
        return override
    name, fields = parse_backend("auto" if override is None else override)
    auto = name == "auto"
    if auto:
        name = default_preset(device)
    backend = dataclasses.replace(PRESETS[name], **fields)
    if spec is None:
        return backend
    reason = page_format_reason(backend, head_dim=spec.head_dim, page_size=spec.page_size, dtype=spec.dtype)
    if reason is None:
        return backend
    if auto and not fields:
        if kv_quant.is_quantized(spec.dtype):
            # 8-bit pages: Triton prefill (it dequantizes them), the rest of the device's preset kept.
            return dataclasses.replace(backend, prefill="triton")
        return PRESETS["pallas"]
    raise ValueError(f"backend {override!r} cannot serve this KV cache ({spec}): {reason}")


__all__ = ["Backend", "CHOICES", "PRESETS", "REFERENCE", "default_preset", "page_format_reason",
           "parse_backend", "select_backend"]
