"""Random PEFT adapters written to disk for a model config, and the same adapter merged into HF weights."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from jpaged.lora import TARGETS
from jpaged.lora.manager import target_dims
from models import ModelConfig
from tests.hf_reference import jpaged_from_hf

_MODULE = {t: ("self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for t in TARGETS}


def write_adapter(path: str, model_config: ModelConfig, *, rank: int, alpha: float = 16.0, seed: int = 0,
                  targets=TARGETS, use_rslora: bool = False, std: float = 0.05, **config_fields) -> str:
    """A PEFT LoRA directory with random A and B (nonzero B, so the adapter changes the output)."""
    rng = np.random.default_rng(seed)
    dims = target_dims(model_config)
    tensors = {}
    for i in range(model_config.num_layers):
        for t in targets:
            din, dout = dims[t]
            prefix = f"base_model.model.model.layers.{i}.{_MODULE[t]}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, std, (rank, din)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, std, (dout, rank)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), bias="none",
                  use_rslora=use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM") | config_fields
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


def merged_hf_state(hf_state: dict, path: str) -> dict:
    """HF weights {name: tensor} with the adapter at `path` merged in: W + scale * B @ A."""
    from safetensors.numpy import load_file
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    lora = load_file(os.path.join(path, "adapter_model.safetensors"))
    merged = {k: v.detach().clone().float() for k, v in hf_state.items()}
    for name, a in lora.items():
        if ".lora_A." not in name:
            continue
        b = lora[name.replace(".lora_A.", ".lora_B.")]
        base = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        merged[base] += torch.from_numpy(scale * (b @ a))
    return merged


def merged_model(hf_model, path: str):
    """A fresh jpaged model of hf_model's weights with the adapter merged in."""
    import copy
    hf = copy.deepcopy(hf_model)
    hf.load_state_dict(merged_hf_state(hf_model.state_dict(), path))
    return jpaged_from_hf(hf)
