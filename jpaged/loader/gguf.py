"""GGUF files (llama.cpp) -> config, weights and tokenizer, with the `gguf` package only.

Weights are dequantized one tensor at a time (`gguf.quants.dequantize`) and renamed to HF names so the
one HF weight table applies. llama.cpp's converter interleaves the rows of `attn_q`/`attn_k` of
`llama` files for its RoPE layout (pairs (i, i + D/2) become adjacent); `_unpermute_rows` undoes it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tokenizers
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jpaged.loader.hf import build_model
from jpaged.loader.tokenizer import Tokenizer, bytes_to_unicode
from models import ModelConfig

# GGUF `general.architecture` -> HF `architectures` entry.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF tensor name pattern -> HF name template (`{i}` the layer index).
TENSOR_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{i}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", "model.layers.{i}.self_attn.{1}_proj.{2}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_([qk])_norm\.weight", "model.layers.{i}.self_attn.{1}_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", "model.layers.{i}.mlp.{1}_proj.weight"),
]
_TENSOR_NAMES = [(re.compile(p + "$"), t) for p, t in TENSOR_NAMES]

# `tokenizer.ggml.pre` -> the split regex its merges were learned with; others use GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def open_gguf(path: str | Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader fails with struct/Value/Index errors on a damaged file
        raise ValueError(f"{path}: corrupt or unreadable GGUF file ({type(e).__name__}: {e})") from None


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """The HF `config.json` dict this file describes; ValueError for an architecture jpaged cannot run."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF files with a rope_freqs tensor (Llama-3.1 RoPE scaling) are not supported")
    if field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"GGUF RoPE scaling {field(reader, f'{arch}.rope.scaling.type')!r} is not supported")

    def key(name, default=None):
        value = field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return value

    num_heads = key("attention.head_count")
    hidden = key("embedding_length")
    tokens = field(reader, "tokenizer.ggml.tokens", [])
    return {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": key("vocab_size", len(tokens) or None),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": key("attention.key_length", hidden // num_heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows [r0, r_half, r1, r_half+1, ...] -> [r0, r1, ..., r_half, ...]."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str:
    for pattern, template in _TENSOR_NAMES:
        m = pattern.match(gguf_name)
        if m:
            groups = m.groups()
            return template.format(*groups, i=groups[0] if groups else "")
    raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")


def iter_gguf_weights(reader: GGUFReader, hf_config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) per tensor, dequantized one at a time."""
    permuted = hf_config["architectures"] == [ARCHITECTURES["llama"]]
    heads = {"q": hf_config["num_attention_heads"], "k": hf_config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"cannot dequantize GGUF tensor {tensor.name!r} "
                             f"({tensor.tensor_type.name}): {e}") from None
        m = re.match(r"blk\.\d+\.attn_([qk])\.", tensor.name)
        if permuted and m:
            w = _unpermute_rows(w, heads[m.group(1)])
        yield name, w


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def gguf_tokenizer(reader: GGUFReader) -> Tokenizer:
    """The byte-level BPE tokenizer, special tokens and chat template stored in the file's metadata."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    tok = _byte_level_bpe(tokens, field(reader, "tokenizer.ggml.merges", []), field(reader, "tokenizer.ggml.pre"))
    types = field(reader, "tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values())
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocab.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == TOKEN_TYPE_USER_DEFINED])
    special = {name: _token(tokens, field(reader, f"tokenizer.ggml.{key}"))
               for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                 ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    tok.post_processor = _post_processor(special, tok, field(reader, "tokenizer.ggml.add_bos_token", False),
                                         field(reader, "tokenizer.ggml.add_eos_token", False))
    eot = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return Tokenizer(tok, chat_template=field(reader, "tokenizer.chat_template"), special_tokens=special,
                     eos_token_ids=[i for i in eot if i is not None])


def _token(tokens: list[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def _post_processor(special, tok, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    bos = special["bos_token"] if add_bos and special["bos_token"] else None
    eos = special["eos_token"] if add_eos and special["eos_token"] else None
    single = [*([bos] if bos else []), "$A", *([eos] if eos else [])]
    pair = [*single, *([bos] if bos else []), "$B:1", *([eos] if eos else [])]
    used = [t for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(used)])


def load_gguf(path: str | Path, dtype: str = "float32"):
    """(model in `dtype`, Tokenizer) from a GGUF file."""
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader)
    cfg = ModelConfig.from_hf(hf_config)
    tokenizer = gguf_tokenizer(reader)
    return build_model(cfg, dtype, iter_gguf_weights(reader, hf_config)), tokenizer
