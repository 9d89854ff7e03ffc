"""Incremental detokenization (multi-byte characters split across tokens) and stop strings."""
import functools

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jpaged.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringChecker

CORPUS = "Hello wörld 😀 你好世界 naïve café 🎉🎉 stop here. ÆØÅ ünïcödé 🚀 日本語のテキスト. "
SPECIAL = "<|end|>"


@functools.cache
def byte_level_bpe() -> Tokenizer:
    """A tiny byte-level BPE: its merges split emojis and CJK characters across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS * 4], trainer)
    return tok


texts = st.text(alphabet=st.sampled_from(sorted(set(CORPUS))), min_size=1, max_size=40)


def chunked(ids, cuts):
    bounds = [0, *sorted({c % (len(ids) + 1) for c in cuts}), len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def test_a_token_holding_half_a_character_emits_nothing_until_completed():
    tok = byte_level_bpe()
    ids = tok.encode("😀").ids
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith(REPLACEMENT_CHAR)
    detok = IncrementalDetokenizer(tok)
    assert [detok.add_tokens([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


@settings(max_examples=60, deadline=None)
@given(prompt=texts, output=texts, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_streamed_pieces_join_to_the_full_decode_and_never_hold_u_fffd(prompt, output, cuts):
    tok = byte_level_bpe()
    prompt_ids, output_ids = tok.encode(prompt).ids, tok.encode(output).ids
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.add_tokens(chunk) for chunk in chunked(output_ids, cuts)]
    pieces.append(detok.flush())
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    full = tok.decode(prompt_ids + output_ids)
    assert "".join(pieces) == detok.text == full[len(tok.decode(prompt_ids)):]


@pytest.mark.parametrize("skip, expected", [(True, "你好 😀"), (False, "你好<|end|> 😀")])
def test_special_tokens_are_skipped_or_kept(skip, expected):
    tok = byte_level_bpe()
    ids = tok.encode("你好").ids + [tok.token_to_id(SPECIAL)] + tok.encode(" 😀").ids
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    assert "".join(detok.add_tokens([i]) for i in ids) + detok.flush() == expected


def feed_all(checker, pieces):
    emitted, matched = [], None
    for piece in pieces:
        out, matched = checker.feed(piece)
        emitted.append(out)
        if matched:
            break
    if matched is None:
        emitted.append(checker.flush())
    return "".join(emitted), matched


def split(text, cuts):
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=100, deadline=None)
@given(before=st.text("ab ", max_size=15), after=st.text("ab ", max_size=15),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_string_across_any_split_is_never_emitted(before, after, cuts):
    stops = ["abba", "b a b"]
    text = before + "abba" + after
    emitted, matched = feed_all(StopStringChecker(stops), split(text, cuts))
    first = min((text.find(s), s) for s in stops if s in text)
    assert (emitted, matched) == (text[:first[0]], first[1])


@settings(max_examples=60, deadline=None)
@given(text=st.text("xyz ", max_size=30), cuts=st.lists(st.integers(0, 40), max_size=10))
def test_without_a_match_every_character_comes_out(text, cuts):
    emitted, matched = feed_all(StopStringChecker(["xyzzy"]), split(text, cuts))
    if "xyzzy" not in text:
        assert (emitted, matched) == (text, None)


def test_the_last_len_stop_minus_one_characters_are_held_back():
    checker = StopStringChecker(["STOP"])
    assert checker.feed("hello ST") == ("hello", None)
    assert checker.feed("ART") == (" ST", None)
    assert checker.feed(" and STOP now") == ("ART and ", "STOP")
    assert checker.feed("more") == ("", "STOP")


def test_stop_string_spanning_tokens_of_a_real_tokenizer():
    tok = byte_level_bpe()
    ids = tok.encode("naïve café 🎉🎉 stop here. 日本語").ids
    detok, checker = IncrementalDetokenizer(tok), StopStringChecker(["🎉 stop", "日本"])
    emitted, matched = feed_all(checker, [detok.add_tokens([i]) for i in ids])
    assert (emitted, matched) == ("naïve café 🎉", "🎉 stop")


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop"):
        StopStringChecker([""])
