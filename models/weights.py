"""The one declarative table from HF checkpoint names to jpaged parameter paths, and its application."""
from __future__ import annotations

import re
from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

# (HF name pattern, jpaged path template, transpose). `{i}` is the layer index.
HF_WEIGHT_MAP = [
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.norm\.weight", "norm.weight", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{i}.input_layernorm.weight", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight",
     "layers.{i}.post_attention_layernorm.weight", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "layers.{i}.self_attn.{p}_proj.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", "layers.{i}.self_attn.{p}_proj.bias", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", "layers.{i}.self_attn.{p}_norm.weight", False),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers.{i}.mlp.{p}_proj.kernel", True),
]
_COMPILED = [(re.compile(p + "$"), t, tr) for p, t, tr in HF_WEIGHT_MAP]
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def hf_name_to_path(name: str) -> tuple[tuple[str | int, ...], bool] | None:
    """('layers', 3, 'mlp', 'up_proj', 'kernel'), transpose; None for names that carry no weight."""
    for pattern, template, transpose in _COMPILED:
        m = pattern.match(name)
        if m:
            groups = m.groups()
            path = template.format(i=groups[0] if groups else "", p=groups[1] if len(groups) > 1 else "")
            return tuple(int(s) if s.isdigit() else s for s in path.split(".")), transpose
    if IGNORED.match(name):
        return None
    raise ValueError(f"unexpected weight {name!r} in checkpoint")


def load_hf_weights(model: nnx.Module, weights: Iterable[tuple[str, np.ndarray]]) -> None:
    """Assigns HF-named arrays into `model` in place, one tensor at a time (cast to the param dtype).

    Raises ValueError on a shape mismatch or when a parameter of the model received no weight.
    """
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    missing = set(flat)
    for name, array in weights:
        found = hf_name_to_path(name)
        if found is None:
            continue
        path, transpose = found
        if path not in flat:
            if path == ("lm_head", "kernel"):
                continue  # tied embeddings: the checkpoint may still carry a copy of the head
            raise ValueError(f"checkpoint weight {name!r} has no place in this model ({'.'.join(map(str, path))})")
        param = flat[path]
        value = np.asarray(array)
        if transpose:
            value = value.T
        if value.shape != param.shape:
            raise ValueError(f"weight {name!r} has shape {value.shape}, model expects {param.shape}")
        param.set_value(jnp.asarray(value, dtype=param.dtype))
        missing.discard(path)
    if missing:
        names = sorted(".".join(map(str, p)) for p in missing)
        raise ValueError(f"checkpoint lacks {len(names)} weights, e.g. {names[:3]}")
    nnx.update(model, nnx.from_flat_state(flat))
