"""LoRAManager: adapters known to the engine (host copies) and the `max_loras` device slots they run from.

Device layout, per layer and projection of the served model: A [Din, L, R] and B [L, R, Dout] for
L = max_loras slots of rank R = max_lora_rank (an adapter of a smaller rank is zero-padded, one without
a target is all zeros there; B holds the scale). A fused projection (`fused=True`: q/k/v as `qkv_proj`,
gate/up as `gate_up_proj`, as `LlamaForCausalLM.fuse_projections` lays them out) has one slot pair for
its targets together: their A side by side ([Din, L, kR]) and their B block-diagonal ([L, kR, Dout], for
gate/up with the columns interleaved as the fused weight's), so the step runs one shrink and one expand
GEMM per fused projection. These arrays are an argument of the jitted step, never a constant of it, so loading
an adapter into a slot (a jitted scatter of the slot's rows, the slot index traced) compiles once and a
step never recompiles for a change of adapters. Slots are handed out least recently used first;
an evicted adapter keeps its host copy and comes back with one host-to-device copy.

Under tensor parallelism (`mesh`) A and B are split as their base weight: for the column-parallel
q/k/v/gate/up, B over its output features (A replicated); for the row-parallel o/down, A over its input
features (B replicated). Where the served model repeats kv heads (`models.sharding.tp_model_config`),
the k/v adapters' B repeats them the same way.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jpaged.lora.peft import LoRAAdapter, load_peft_adapter
from jpaged.lora.request import LoRARequest
from pallas_kernels.matmul_mgpu import interleave_gate_up


def target_dims(model_config) -> dict[str, tuple[int, int]]:
    """(Din, Dout) of each LoRA target of a Llama-family model."""
    e, f = model_config.hidden_size, model_config.intermediate_size
    q, kv = model_config.num_heads * model_config.head_dim, model_config.num_kv_heads * model_config.head_dim
    return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, f), "up_proj": (e, f), "down_proj": (f, e)}


ROW_PARALLEL = ("o_proj", "down_proj")
# fused projection -> its targets, in the order of the fused weight's columns
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def slot_layout(model_config, fused: bool) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """{projection: (its targets, Din, Dout)}: the slot pairs of each layer of the served model."""
    dims = target_dims(model_config)
    if not fused:
        return {t: ((t,), din, dout) for t, (din, dout) in dims.items()}
    layout = {}
    for name, members in (("qkv_proj", FUSED["qkv_proj"]), ("o_proj", ("o_proj",)),
                          ("gate_up_proj", FUSED["gate_up_proj"]), ("down_proj", ("down_proj",))):
        layout[name] = (members, dims[members[0]][0], sum(dims[t][1] for t in members))
    return layout


def slot_specs(target: str) -> tuple[P, P]:
    """(A, B) partition specs of one target's slots, matching its base weight (models/sharding.py)."""
    from models.sharding import MODEL

    return (P(MODEL, None, None), P()) if target in ROW_PARALLEL else (P(), P(None, None, MODEL))


def _repeat_kv_heads(b: np.ndarray, dout: int, head_dim: int, path: str, target: str) -> np.ndarray:
    """b [.., R, Hkv * D] with each kv head repeated to fill `dout` features (the served model's heads)."""
    have = b.shape[-1]
    if have == dout:
        return b
    if dout % have or have % head_dim:
        raise ValueError(f"LoRA adapter {path!r}: {target} has {have} output features; the model's has {dout}")
    heads = b.reshape(*b.shape[:-1], have // head_dim, head_dim)
    return np.repeat(heads, dout // have, axis=-2).reshape(*b.shape[:-1], dout)


def _write_slot(slots, slot, new):
    """slots with slot `slot` replaced by `new` (per layer {target: (a [Din, R], b [R, Dout])})."""
    return tuple({t: (a.at[:, slot].set(new[i][t][0]), b.at[slot].set(new[i][t][1])) for t, (a, b) in layer.items()}
                 for i, layer in enumerate(slots))


class LoRAManager:
    """Host copies of the registered adapters (by `lora_int_id`) and the device slots.

    `activate(ids)` before each step puts those adapters in slots and returns {id: slot}; `weights` is
    then the step's LoRA argument."""

    def __init__(self, model_config, *, max_loras: int, max_lora_rank: int, dtype, fused: bool = False, mesh=None):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
        self.max_loras, self.max_rank, self.dtype = max_loras, max_lora_rank, jnp.dtype(dtype)
        self.num_layers, self.head_dim = model_config.num_layers, model_config.head_dim
        if fused and mesh is not None:
            raise ValueError("LoRAManager: fused projections are for one device; under a mesh pass fused=False")
        self.dims = target_dims(model_config)
        self.layout = slot_layout(model_config, fused)
        l, r = max_loras, max_lora_rank

        def zeros(shape, spec):
            if mesh is None:
                return jnp.zeros(shape, self.dtype)
            return jnp.zeros(shape, self.dtype, device=NamedSharding(mesh, spec))

        self.weights = tuple({name: (zeros((din, l, len(members) * r), slot_specs(name)[0]),
                                     zeros((l, len(members) * r, dout), slot_specs(name)[1]))
                              for name, (members, din, dout) in self.layout.items()} for _ in range(self.num_layers))
        self.requests: dict[int, LoRARequest] = {}
        self._host: dict[int, tuple] = {}  # id -> per layer {target: (a [Din, R], b [R, Dout])}, padded
        self._slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU first
        self._free = list(range(max_loras))
        self._write = jax.jit(_write_slot, donate_argnums=0,
                              out_shardings=None if mesh is None else jax.tree.map(lambda x: x.sharding, self.weights))
        self.num_loads = 0
        self.num_evictions = 0

    # -- the registry ----------------------------------------------------------------------------

    def add(self, request: LoRARequest) -> None:
        """Registers the adapter (reads it from disk the first time its id is seen); ValueError for an
        adapter that does not fit the model or max_lora_rank, or an id or name already used otherwise."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self.requests.get(request.lora_int_id)
        if known is not None:
            if known != request:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already {known}, not {request}")
            return
        if any(r.lora_name == request.lora_name for r in self.requests.values()):
            raise ValueError(f"lora_name {request.lora_name!r} is already loaded with another lora_int_id")
        adapter = load_peft_adapter(request.lora_path, num_layers=self.num_layers, max_rank=self.max_rank)
        self._host[request.lora_int_id] = self._slot_arrays(adapter)
        self.requests[request.lora_int_id] = request

    def remove(self, lora_int_id: int) -> None:
        """Forgets the adapter and frees its slot; ValueError for an unknown id."""
        if lora_int_id not in self.requests:
            raise ValueError(f"no LoRA adapter with lora_int_id {lora_int_id}")
        del self.requests[lora_int_id], self._host[lora_int_id]
        slot = self._slot_of.pop(lora_int_id, None)
        if slot is not None:
            self._free.append(slot)

    def by_name(self, name: str) -> LoRARequest | None:
        return next((r for r in self.requests.values() if r.lora_name == name), None)

    def _slot_arrays(self, adapter: LoRAAdapter) -> tuple:
        weights = {}
        for target, (a, b) in adapter.weights.items():
            din, dout = self.dims[target]
            if target in ("k_proj", "v_proj"):
                b = _repeat_kv_heads(b, dout, self.head_dim, adapter.path, target)
            if a.shape[1] != din or b.shape[2] != dout:
                raise ValueError(f"LoRA adapter {adapter.path!r}: {target} maps {a.shape[1]} -> {b.shape[2]} "
                                 f"features; the model's {target} maps {din} -> {dout}")
            weights[target] = (a, b)
        return tuple({name: self._slot_pair(name, members, din, dout, weights, adapter.rank, i)
                      for name, (members, din, dout) in self.layout.items()} for i in range(self.num_layers))

    def _slot_pair(self, name, members, din, dout, weights, rank, layer) -> tuple[np.ndarray, np.ndarray]:
        """(a [Din, kR], b [kR, Dout]) of one projection in one layer: member j's A in columns
        [jR, jR + rank), its B in rows [jR, jR + rank) under its own output columns."""
        r = self.max_rank
        a = np.zeros((din, len(members) * r), self.dtype)
        b = np.zeros((len(members) * r, dout), self.dtype)
        col = 0
        parts = []  # gate/up: each member's B over its own F columns, interleaved below
        for j, target in enumerate(members):
            width = self.dims[target][1]
            part = b[:, col:col + width] if name != "gate_up_proj" else np.zeros((len(members) * r, width), self.dtype)
            if target in weights:
                a[:, j * r:j * r + rank] = weights[target][0][layer]
                part[j * r:j * r + rank] = weights[target][1][layer]
            parts.append(part)
            col += width
        if name == "gate_up_proj":
            b = np.asarray(interleave_gate_up(*parts))
        return a, b

    # -- the slots -------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compiles the slot write (on a free slot, with zeros), so the first adapter load compiles nothing."""
        if not self._free:
            return
        zeros = tuple({name: (np.zeros((din, len(members) * self.max_rank), self.dtype),
                              np.zeros((len(members) * self.max_rank, dout), self.dtype))
                       for name, (members, din, dout) in self.layout.items()} for _ in range(self.num_layers))
        self.weights = self._write(self.weights, jnp.int32(self._free[0]), zeros)

    @property
    def resident(self) -> list[int]:
        """Adapter ids in device slots, least recently used first."""
        return list(self._slot_of)

    def activate(self, lora_int_ids) -> dict[int, int]:
        """{id: slot} with every adapter of `lora_int_ids` (at most max_loras, all registered) in a
        slot, loading the missing ones over the least recently used slots not among them."""
        wanted = list(dict.fromkeys(lora_int_ids))
        if len(wanted) > self.max_loras:
            raise ValueError(f"a step uses {len(wanted)} LoRA adapters, more than max_loras={self.max_loras}")
        for lora_id in wanted:
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
                continue
            if lora_id not in self._host:
                raise ValueError(f"no LoRA adapter with lora_int_id {lora_id}")
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(i for i in self._slot_of if i not in wanted)
                slot = self._slot_of.pop(victim)
                self.num_evictions += 1
            self.weights = self._write(self.weights, jnp.int32(slot), self._host[lora_id])
            self._slot_of[lora_id] = slot
            self.num_loads += 1
        return {lora_id: self._slot_of[lora_id] for lora_id in wanted}
