"""HF checkpoints already in fp8 (`quantization_config.quant_method: "fp8"`, as published for Llama-3):
their fp8 e4m3 weights are dequantized with their `weight_scale` while they stream in, so the model is
built in the requested dtype; `--quantization fp8` then quantizes it again per output channel
(models/fp8_linear.py). The checkpoints' static `input_scale`s are dropped: activations are scaled per
token, dynamically.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
# safetensors' names of the fp8 dtypes, which its numpy / flax readers cannot build arrays of
SAFETENSORS_FP8 = {"F8_E4M3": FP8_DTYPES[0], "F8_E5M2": FP8_DTYPES[1]}


def fp8_tensors(file: Path) -> dict[str, np.ndarray]:
    """The fp8 tensors of a safetensors file, read from its header and data (memory-mapped), by name;
    {} for a file whose header does not parse (safetensors' reader then names the problem)."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > os.path.getsize(file) - 8:
                return {}   # a header longer than the file: corrupt
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, MemoryError):
        return {}   # unreadable: safetensors' own reader reports it
    out = {}
    if not isinstance(header, dict):
        return out
    for name, info in header.items():
        if name != "__metadata__" and isinstance(info, dict) and info.get("dtype") in SAFETENSORS_FP8:
            start, end = info["data_offsets"]
            data = np.memmap(file, np.uint8, "r", offset=8 + size + start, shape=(end - start,))
            out[name] = data.view(SAFETENSORS_FP8[info["dtype"]]).reshape(info["shape"])
    return out


def checkpoint_quantization(hf_config: dict[str, Any]) -> str | None:
    """'fp8' for an fp8 checkpoint, None for an unquantized one; ValueError for any other method."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method={method!r} checkpoints are not supported (only 'fp8')")
    if qc.get("weight_block_size"):
        raise ValueError("quantization_config.weight_block_size (block-wise fp8 scales) is not supported; "
                         "per-tensor and per-channel fp8 checkpoints are")
    return "fp8"


def dequantized(weights: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """`weights` with each fp8 `X.weight` replaced by `X.weight` x `X.weight_scale` in float32 (a scale per
    tensor, `[]` or `[1]`, or per output channel, `[N]` or `[N, 1]`); `X.weight_scale` and `X.input_scale`
    are consumed. A weight waits for its scale (or the scale for its weight): one tensor held at most."""
    weights_waiting: dict[str, np.ndarray] = {}
    scales_waiting: dict[str, np.ndarray] = {}

    def combine(name, w, s):
        s = np.asarray(s, np.float32)
        if s.size == 1:
            s = s.reshape(())
        elif s.size == w.shape[0]:
            s = s.reshape(-1, 1)
        else:
            raise ValueError(f"{name}_scale has shape {s.shape}, expected one scale or one per output row of "
                             f"{name} {w.shape}")
        return name, w.astype(np.float32) * s

    for name, tensor in weights:
        if name.endswith(".input_scale"):
            continue
        if name.endswith(".weight_scale"):
            base = name.removesuffix("_scale")
            if base in weights_waiting:
                yield combine(base, weights_waiting.pop(base), tensor)
            else:
                scales_waiting[base] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in scales_waiting:
                yield combine(name, tensor, scales_waiting.pop(name))
            else:
                weights_waiting[name] = tensor
        else:
            yield name, tensor
    if weights_waiting or scales_waiting:
        missing = sorted(weights_waiting) or sorted(scales_waiting)
        raise ValueError(f"fp8 checkpoint: {missing[:3]} without {'a weight_scale' if weights_waiting else 'a weight'}")
