"""ModelConfig: the static description of a decoder, built from an HF `config.json` dict."""
from __future__ import annotations

import dataclasses
from typing import Any

# HF `architectures` names this package can run, mapped to the family that handles them.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`); `linear` scales positions."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model code needs; frozen and hashable so it can be a static jit argument."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (models/moe.py): `moe_layers` lists the layers whose MLP is a routed block of
    # `num_experts` SwiGLU experts of width `moe_intermediate_size`, `num_experts_per_tok` per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()
    expert_parallel: bool = False  # under a mesh: experts split over the "model" axis, not their width

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.moe_layers:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                value = getattr(self, name)
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"{name} must be a positive integer with MoE layers, got {value!r}")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                                 f"({self.num_experts})")
            if not all(0 <= i < self.num_layers for i in self.moe_layers):
                raise ValueError(f"moe_layers must be layer indices in [0, {self.num_layers}), got {self.moe_layers}")

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json`; ValueError on what we cannot run."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            rope = hf.get("rope_parameters") or {}
            rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = hf.get("sliding_window")
            if family == "qwen2" and not hf.get("use_sliding_window", False):
                window = None
            if family in ("llama", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
                window = None
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
                qk_norm=family in ("qwen3", "qwen3_moe"),
                sliding_window=int(window) if window else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **_moe_fields(family, hf),
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The inverse of from_hf, enough for HF transformers to build the same model."""
        hf = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dataclasses.asdict(self.rope_scaling) | {"rope_theta": self.rope_theta}
        if self.family == "llama":
            hf["attention_bias"] = self.qkv_bias
        if self.sliding_window is not None:
            hf["sliding_window"] = self.sliding_window
            hf["use_sliding_window"] = True
        if self.family == "mixtral":
            hf |= {"num_local_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                   "intermediate_size": self.moe_intermediate_size}
        elif self.family == "qwen3_moe":
            hf |= {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                   "moe_intermediate_size": self.moe_intermediate_size, "norm_topk_prob": self.norm_topk_prob,
                   "decoder_sparse_step": 1,
                   "mlp_only_layers": [i for i in range(self.num_layers) if i not in self.moe_layers]}
        return hf

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def num_params(self, *, active: bool = False) -> int:
        """Parameters of the model; `active`: those one token reads (its `num_experts_per_tok` experts of
        each MoE layer, not all `num_experts`)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        experts = self.num_experts_per_tok if active else self.num_experts
        moe_mlp = experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
        mlps = sum(moe_mlp if i in self.moe_layers else 3 * d * f for i in range(self.num_layers))
        per_layer = attn + 2 * d
        return self.num_layers * per_layer + mlps + v * d * (1 if self.tie_word_embeddings else 2) + d


def _moe_fields(family: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of a Mixtral (every layer routed) or Qwen3-MoE (`decoder_sparse_step`,
    `mlp_only_layers`) config; {} for dense families."""
    if family not in MOE_FAMILIES:
        return {}
    num_layers = int(hf["num_hidden_layers"])
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    if family == "mixtral":
        return dict(num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                    moe_layers=tuple(range(num_layers)) if experts else ())
    step = int(hf.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    dense = set(hf.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(num_layers) if experts and i not in dense and (i + 1) % step == 0)
    return dict(num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_layers=layers)


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    rope_type = raw.get("rope_type") or raw.get("type")
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("llama3", "linear"):
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: llama3, linear")
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
