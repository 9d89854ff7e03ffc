"""Test helpers: tiny tokenizers and a GGUF writer that lays tensors out as llama.cpp's converter does."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers, decoders, trainers

from jpaged.loader.tokenizer import bytes_to_unicode

# A Llama-3-style template: BOS variable, role checks through raise_exception, tojson on content.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] | tojson }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

SPECIALS = ["<|endoftext|>", "<s>", "</s>"]
CORPUS = ["Hello world, the capital of France is Paris.", "Grüße aus Köln! 日本語のテキスト。",
          "def f(x):\n    return x * 2  # code", "numbers 12345 and emoji 🎉"] * 20


def trained_bpe(vocab_size: int = 256) -> RustTokenizer:
    """A byte-level BPE with a few merges; ids 0..2 are the special tokens."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_hf_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """tokenizer.json + tokenizer_config.json as HF transformers saves them."""
    trained_bpe(vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "chat_template": CHAT_TEMPLATE}))


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute` of attn_q/attn_k rows, as written there."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


HF_TO_GGUF = [
    ("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"), ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
]


def gguf_name(hf_name: str) -> str:
    for hf, gg in HF_TO_GGUF:
        if hf_name == hf:
            return gg
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    for hf, gg in HF_TO_GGUF:
        if rest == hf:
            return f"blk.{layer}.{gg}"
    proj, kind = rest.split(".")[-2:]
    return f"blk.{layer}.{ {'q_proj': 'attn_q', 'k_proj': 'attn_k', 'v_proj': 'attn_v', 'gate_proj': 'ffn_gate', 'up_proj': 'ffn_up', 'down_proj': 'ffn_down'}[proj] }.{kind}"


def write_gguf(hf_model, path: Path, arch: str) -> None:
    """The HF model as an F32 GGUF of `arch`, q/k rows permuted for `llama` as llama.cpp does."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spelling = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([spelling[b] for b in range(c.vocab_size)])
    w.add_token_types([3 if b < 3 else 1 for b in range(c.vocab_size)])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            a = llama_cpp_permute(a, heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
