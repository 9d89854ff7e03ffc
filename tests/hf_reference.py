"""Helpers that build tiny random HF transformers models and the matching jpaged model."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from models import ModelConfig, LlamaForCausalLM
from models.weights import load_hf_weights

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            rms_norm_eps=1e-6)

FAMILIES = {
    "llama3": ("LlamaForCausalLM", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama_tied": ("LlamaForCausalLM", transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": ("MistralForCausalLM", transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=24)),
    "qwen2": ("Qwen2ForCausalLM", transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=False)),
}

# Mixture of experts: Mixtral (every layer routed, top-2 renormalised) and Qwen3-MoE with a dense layer
# between routed ones and the top-k weights left unnormalised. Expert width 64: the Pallas grouped GEMM's
# SwiGLU tile.
MOE_FAMILIES = {
    "mixtral": ("MixtralForCausalLM", transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=3,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=False)),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of `family` in fp32 eval mode (eager attention, so windows apply)."""
    arch, config_cls, model_cls, extra = FAMILIES[family] if family in FAMILIES else MOE_FAMILIES[family]
    config = config_cls(**(TINY | extra | overrides), architectures=[arch])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF inits norms to ones and biases to zero; randomise them so the tests can see a mix-up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):  # routers: spread logits so the top-k has no near-ties
                p.copy_(torch.randn_like(p))
    return model


def jpaged_from_hf(hf_model, dtype=np.float32) -> LlamaForCausalLM:
    if hf_model.config.model_type in MOE_FAMILIES:
        return jpaged_from_hf_dir(hf_model, dtype)
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    model = LlamaForCausalLM(cfg, dtype=dtype)
    load_hf_weights(model, ((k, v.detach().float().numpy()) for k, v in hf_model.state_dict().items()))
    return model


def jpaged_from_hf_dir(hf_model, dtype=np.float32) -> LlamaForCausalLM:
    """Through a checkpoint HF writes (`save_pretrained`: per-expert tensor names) and jpaged's HF-dir loader."""
    import tempfile

    from jpaged.loader.hf import load_hf_dir
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        return load_hf_dir(tmp, dtype="bfloat16" if dtype != np.float32 else "float32")


def hf_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids)[None])).logits[0].float().numpy()


def hf_greedy(hf_model, ids, num_new: int) -> list[int]:
    """Greedy continuation with HF's own forward and KV cache, never stopping at EOS."""
    out, past = [], None
    x = torch.tensor(np.asarray(ids)[None])
    with torch.no_grad():
        for _ in range(num_new):
            res = hf_model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out
