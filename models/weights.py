"""The one declarative table from HF checkpoint names to jpaged parameter paths, and its application."""
from __future__ import annotations

import re
from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

# (HF name pattern, jpaged path template, transpose). Named groups fill the template: `i` the layer, `p`
# the projection; `e` (an expert of an MoE layer) indexes the leading axis of a stacked [X, ...] parameter.
L = r"model\.layers\.(?P<i>\d+)"
HF_WEIGHT_MAP = [
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.norm\.weight", "norm.weight", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (L + r"\.input_layernorm\.weight", "layers.{i}.input_layernorm.weight", False),
    (L + r"\.post_attention_layernorm\.weight", "layers.{i}.post_attention_layernorm.weight", False),
    (L + r"\.self_attn\.(?P<p>[qkvo])_proj\.weight", "layers.{i}.self_attn.{p}_proj.kernel", True),
    (L + r"\.self_attn\.(?P<p>[qkv])_proj\.bias", "layers.{i}.self_attn.{p}_proj.bias", False),
    (L + r"\.self_attn\.(?P<p>[qk])_norm\.weight", "layers.{i}.self_attn.{p}_norm.weight", False),
    (L + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", "layers.{i}.mlp.{p}_proj.kernel", True),
    # Mixture of experts (models/moe.py): the router, and each expert's SwiGLU stacked to [X, ...].
    (L + r"\.(mlp|block_sparse_moe)\.gate\.weight", "layers.{i}.mlp.router.kernel", True),
    (L + r"\.mlp\.experts\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight", "layers.{i}.mlp.experts_{p}.{e}", True),
    (L + r"\.block_sparse_moe\.experts\.(?P<e>\d+)\.w1\.weight", "layers.{i}.mlp.experts_gate.{e}", True),
    (L + r"\.block_sparse_moe\.experts\.(?P<e>\d+)\.w3\.weight", "layers.{i}.mlp.experts_up.{e}", True),
    (L + r"\.block_sparse_moe\.experts\.(?P<e>\d+)\.w2\.weight", "layers.{i}.mlp.experts_down.{e}", True),
]
_COMPILED = [(re.compile(p + "$"), t, tr) for p, t, tr in HF_WEIGHT_MAP]
STACKED = "experts_"  # parameters whose checkpoint tensors are one slice each of the leading axis
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def hf_name_to_path(name: str) -> tuple[tuple[str | int, ...], bool] | None:
    """('layers', 3, 'mlp', 'up_proj', 'kernel'), transpose; None for names that carry no weight.
    An expert's weight ends in its index: ('layers', 0, 'mlp', 'experts_up', 5) is row 5 of experts_up."""
    for pattern, template, transpose in _COMPILED:
        m = pattern.match(name)
        if m:
            path = template.format(**m.groupdict())
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
    stacks: dict[tuple, tuple[np.ndarray, set[int]]] = {}  # stacked parameter -> (host buffer, rows filled)
    for name, array in weights:
        found = hf_name_to_path(name)
        if found is None:
            continue
        path, transpose = found
        if path[:-1] in flat and isinstance(path[-1], int) and str(path[-2]).startswith(STACKED):
            _fill_row(flat[path[:-1]], stacks, path, name, np.asarray(array), transpose)
            continue
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
    for path, (buffer, rows) in stacks.items():
        if len(rows) != buffer.shape[0]:
            absent = sorted(set(range(buffer.shape[0])) - rows)
            raise ValueError(f"checkpoint lacks experts {absent[:5]} of {'.'.join(map(str, path))}")
        flat[path].set_value(jnp.asarray(buffer))
        missing.discard(path)
    if missing:
        names = sorted(".".join(map(str, p)) for p in missing)
        raise ValueError(f"checkpoint lacks {len(names)} weights, e.g. {names[:3]}")
    nnx.update(model, nnx.from_flat_state(flat))


def _fill_row(param, stacks, path, name, value, transpose) -> None:
    """Copies one expert's tensor into row path[-1] of its stacked parameter's host buffer."""
    key, row = path[:-1], path[-1]
    if key not in stacks:
        stacks[key] = (np.zeros(param.shape, np.dtype(param.dtype)), set())
    buffer, rows = stacks[key]
    value = value.T if transpose else value
    if not 0 <= row < buffer.shape[0] or value.shape != buffer.shape[1:]:
        raise ValueError(f"weight {name!r} of shape {value.shape} has no place in "
                         f"{'.'.join(map(str, key))} of shape {buffer.shape}")
    buffer[row] = value
    rows.add(row)
