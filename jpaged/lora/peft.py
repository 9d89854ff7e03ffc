"""PEFT LoRA adapters from a local directory: `adapter_config.json` + `adapter_model.safetensors`.

An adapter adds `scale * x @ A^T @ B^T` to each targeted projection, with PEFT's shapes A [r, in] and
B [out, r] and `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Here every
target's weights are stacked over layers as A [layers, in, r] and B [layers, r, out], B already
scaled; the device slots (jpaged/lora/manager.py) pad and place them. What PEFT can express and this does not
run (DoRA, biases, extra trained modules, per-layer ranks, embeddings or the head) is refused by name.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

# The projections an adapter may target, in the order the model applies them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_WEIGHT = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# Fields that must stay off (unset, false or empty) for the adapter to be a plain LoRA of the listed targets.
_MUST_BE_OFF = ("use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "layers_pattern",
                "rank_pattern", "alpha_pattern", "trainable_token_indices", "lora_bias", "use_qalora",
                "megatron_config", "target_parameters")


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """One adapter on the host: rank, scale and per target (A [layers, in, r], B [layers, r, out]) float32, B scaled."""

    path: str
    rank: int
    scale: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def num_layers(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]


def read_adapter_config(path: str) -> dict:
    """The adapter's config, checked: a LoRA of supported targets with one rank for every layer."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {path!r}: no adapter_config.json (expected a PEFT adapter directory)")
    with open(config_path) as f:
        config = json.load(f)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type must be 'LORA', got {peft_type!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA adapter {path!r}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA adapter {path!r}: lora_alpha must be a positive number, got {alpha!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r}: bias={config['bias']!r} is not supported (only 'none')")
    for field in _MUST_BE_OFF:
        if config.get(field) not in (None, False, [], {}):
            raise ValueError(f"LoRA adapter {path!r}: {field}={config[field]!r} is not supported (leave it unset)")
    config["target_modules"] = _targets(path, config.get("target_modules"))
    return config


def _targets(path: str, targets) -> tuple[str, ...]:
    if targets == "all-linear":
        return TARGETS
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA adapter {path!r}: target_modules must be a list of {TARGETS} or 'all-linear', "
                         f"got {targets!r}")
    unsupported = sorted(set(targets) - set(TARGETS))
    if unsupported:
        raise ValueError(f"LoRA adapter {path!r}: target_modules {unsupported} are not supported "
                         f"(supported: {TARGETS})")
    return tuple(t for t in TARGETS if t in targets)


def load_peft_adapter(path: str, *, num_layers: int, max_rank: int | None = None) -> LoRAAdapter:
    """Reads the adapter at `path` for a model of `num_layers` layers; ValueError naming the field or
    weight that does not fit (a rank above `max_rank`: the engine's max_lora_rank)."""
    from safetensors.numpy import load_file

    config = read_adapter_config(path)
    rank = config["r"]
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"LoRA adapter {path!r}: r={rank} exceeds max_lora_rank={max_rank}")
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise ValueError(f"LoRA adapter {path!r}: no adapter_model.safetensors")
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, array in load_file(weights_path).items():
        m = _WEIGHT.match(name)
        if m is None:
            raise ValueError(f"LoRA adapter {path!r}: weight {name!r} is not a LoRA A/B of a decoder layer's "
                             f"projection")
        layer, module, target, which = int(m[1]), m[2], m[3], m[4]
        if target not in config["target_modules"] or _MODULE[target] != module:
            raise ValueError(f"LoRA adapter {path!r}: weight {name!r} is not of target_modules "
                             f"{list(config['target_modules'])}")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path!r}: weight {name!r} is for layer {layer}; the model has "
                             f"{num_layers}")
        found.setdefault((target, which), {})[layer] = np.asarray(array, np.float32)
    weights = {}
    for target in config["target_modules"]:
        a, b = (_stack(path, target, which, found.get((target, which), {}), num_layers) for which in "AB")
        if a.shape[1] != rank or b.shape[2] != rank:
            raise ValueError(f"LoRA adapter {path!r}: {target} has rank {a.shape[1]}/{b.shape[2]} (A/B), "
                             f"but r={rank}")
        weights[target] = (np.ascontiguousarray(a.transpose(0, 2, 1)),                   # [L, in, r]
                           np.ascontiguousarray(b.transpose(0, 2, 1)) * np.float32(scale))  # [L, r, out]
    return LoRAAdapter(path=path, rank=rank, scale=scale, weights=weights)


def _stack(path: str, target: str, which: str, layers: dict[int, np.ndarray], num_layers: int) -> np.ndarray:
    missing = [i for i in range(num_layers) if i not in layers]
    if missing:
        raise ValueError(f"LoRA adapter {path!r}: {target}.lora_{which} is missing for layers {missing}")
    shapes = {layers[i].shape for i in range(num_layers)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"LoRA adapter {path!r}: {target}.lora_{which} must be one 2-D shape in every layer, "
                         f"got {sorted(shapes)}")
    return np.stack([layers[i] for i in range(num_layers)])
