"""Shared fixtures for engine tests: a tiny HF reference model and a byte-level tokenizer."""
import pytest

from tests.hf_reference import jpaged_from_hf, tiny_hf_model


class ByteTokenizer:
    """Every id decodes to one printable ASCII character (vocab 256), so any output is clean text."""

    eos_token_ids = [2]
    bos_token_id = 1
    vocab_size = 256

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 32 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + int(i) % 95) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


@pytest.fixture(scope="session")
def tiny_llama():
    hf = tiny_hf_model("llama3", seed=7)
    return hf, jpaged_from_hf(hf)


@pytest.fixture(scope="session")
def tiny_mistral():
    hf = tiny_hf_model("mistral", seed=8, sliding_window=64)
    return hf, jpaged_from_hf(hf)


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()
