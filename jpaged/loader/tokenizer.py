"""Text <-> token ids and the chat template, over a `tokenizers.Tokenizer` (no transformers at run time).

Built from an HF dir (`tokenizer.json` + `tokenizer_config.json`) or, by `jpaged.loader.gguf`, from GGUF
metadata; `save` writes the same two files, so every converted model carries an HF-style tokenizer.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer(eos_token_ids: Sequence[int] = (), vocab_size: int = 256) -> "Tokenizer":
    """One token per UTF-8 byte (ids 0..255), for presets with random weights that ship no vocabulary.

    Ids 256..vocab_size-1 decode as "<id>", so whatever a random model generates streams as text.
    """
    spelling = bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)} | {f"<{i}>": i for i in range(256, vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer(tok, eos_token_ids=eos_token_ids)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's filter: Jinja's own `tojson` HTML-escapes, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_environment() -> jinja2.Environment:
    """The environment HF transformers renders chat templates in, so templates render identically."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_content(value) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Attributes:
      eos_token_ids: ids that end a generation (the EOS token plus any the model config adds).
      bos_token_id: id of the BOS token, or None.
      vocab_size: number of ids the tokenizer can produce, added tokens included.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None, eos_token_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        eos = [self._tok.token_to_id(self.special_tokens["eos_token"])] if "eos_token" in self.special_tokens else []
        self.eos_token_ids = tuple(dict.fromkeys(i for i in [*eos, *eos_token_ids] if i is not None))
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = self._tok.token_to_id(bos) if bos is not None else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Reads `tokenizer.json`, `tokenizer_config.json` (or `chat_template.jinja`) and the EOS ids of
        `config.json` / `generation_config.json` from an HF model dir."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (jpaged reads fast tokenizers only)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust parser raises a bare Exception on malformed JSON
            raise ValueError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: HF uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        special = {k: _token_content(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        eos_ids = []
        for name in ("config.json", "generation_config.json"):
            eos = _read_json(path / name).get("eos_token_id")
            eos_ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        return cls(tok, chat_template=template, special_tokens=special, eos_token_ids=eos_ids)

    def save(self, path: str | Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json`, readable by `from_dir` and by HF."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- use ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text; the Rust side runs without the GIL, so other threads go on meanwhile."""
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of str")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Renders a conversation to prompt text as HF transformers does (encode it without special tokens).

        Raises ValueError if the model has no chat template or the template rejects the messages.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass plain text instead of messages")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of dicts with 'role' and 'content'")
        if self._template is None:
            self._template = _template_environment().from_string(self.chat_template)
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
