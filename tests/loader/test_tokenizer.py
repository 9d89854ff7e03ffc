"""Tokenizer from an HF dir: encodes, decodes and renders chat templates exactly as HF transformers does."""
import pytest
import transformers
from hypothesis import given, settings, strategies as st

from jpaged.loader.tokenizer import Tokenizer
from tests.loader.helpers import write_hf_tokenizer

TEXTS = ["Hello world", " leading space", "Grüße aus Köln 日本語 🎉", "<s>specials</s> inline", "a\n\n  b\tc"]
CONVERSATION = [{"role": "user", "content": "Ça va? \"quoted\" 日本"}, {"role": "assistant", "content": "oui"},
                {"role": "user", "content": "et toi?"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_hf_tokenizer(path)
    (path / "config.json").write_text('{"eos_token_id": [2, 0]}')
    return path


@pytest.fixture(scope="module")
def both(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_hf(both, text, add_special_tokens):
    ours, hf = both
    assert ours.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
        text, add_special_tokens=add_special_tokens)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_decode_inverts_encode_on_any_text(both, text):
    ours, hf = both
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_hf(both, add_generation_prompt):
    ours, hf = both
    expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert "日本" in got and got.startswith("<s>")  # tojson keeps non-ASCII; bos_token is a variable


def test_template_raise_exception_is_a_value_error(both):
    ours, _ = both
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_special_ids_come_from_configs(both):
    ours, hf = both
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == (2, 0)  # tokenizer eos first, then config.json's extra ids
    assert ours.vocab_size == len(hf)


def test_save_then_from_dir_round_trips(both, tmp_path):
    ours, _ = both
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(TEXTS[2]) == ours.encode(TEXTS[2])
    assert again.apply_chat_template(CONVERSATION) == ours.apply_chat_template(CONVERSATION)
    assert again.bos_token_id == ours.bos_token_id


def test_missing_chat_template_is_a_value_error(tmp_path):
    write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATION)
