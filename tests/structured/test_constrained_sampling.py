"""Constrained decoding on the default model (sampled outputs all validate: the long profile, hundreds;
tests/structured/test_tiny_engine.py is the default profile's quick version), the sampler's bitmask and
logit_bias stages, and what SamplingParams refuses."""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jpaged import SamplingParams, sampling
from jpaged.structured import StructuredOutputsParams

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{1,8}\.[a-z]{1,8}@(example|test)\.(com|org)"
ARITH = """
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""
ARITH_RE = re.compile(r"^[0-9+\-()]+$")
# The default profile's batch stays within 16 rows (the 16-token step bucket); the long one has hundreds.
LONG = os.environ.get("JPAGED_LONG_TESTS") == "1"
NUM_SAMPLES = 256 if LONG else 6


@pytest.fixture(scope="module")
def llm():
    from jpaged import LLM

    # One KV page per 64 tokens and a 64-token step budget: few step shapes, so few compilations.
    seqs = 64 if LONG else 16
    return LLM("default", dtype="float32", block_size=64, num_kv_blocks=4 * seqs, max_num_seqs=seqs,
               max_num_batched_tokens=64, max_model_len=256)


def _prompt(llm, text):
    return llm.chat_prompt_ids([{"role": "user", "content": text}])


@pytest.mark.long
def test_sampled_outputs_validate_and_unconstrained_neighbours_are_unchanged(llm):
    """One batch: NUM_SAMPLES outputs under a nested JSON schema, regex, grammar, json_object and
    logit_bias rows, and three seeded unconstrained rows, which must equal the same rows run alone."""
    person = SamplingParams(temperature=1.0, max_tokens=160, structured_outputs=StructuredOutputsParams(json=NESTED))
    email = SamplingParams(temperature=1.0, max_tokens=32, structured_outputs=StructuredOutputsParams(regex=EMAIL))
    arith = SamplingParams(temperature=1.0, max_tokens=24, structured_outputs=StructuredOutputsParams(grammar=ARITH))
    obj = SamplingParams(temperature=1.0, max_tokens=64, structured_outputs=StructuredOutputsParams(json_object=True))
    banana = llm.tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = SamplingParams(temperature=0.0, max_tokens=3, logit_bias={banana: 100.0})
    free = [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2, 3)]
    free_prompts = [_prompt(llm, "Tell me about cats."), _prompt(llm, "Name a colour."), _prompt(llm, "Count to five.")]
    n_other = max(2, NUM_SAMPLES // 8)
    prompts = ([_prompt(llm, "Describe a user as JSON.")] * NUM_SAMPLES + [_prompt(llm, "An email address?")] * n_other
               + [_prompt(llm, "Write a sum.")] * n_other + [_prompt(llm, "Any JSON please."), _prompt(llm, "Hello")]
               + free_prompts)
    params = [person] * NUM_SAMPLES + [email] * n_other + [arith] * n_other + [obj, biased] + free
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    people, outs = outs[:NUM_SAMPLES], outs[NUM_SAMPLES:]
    emails, sums, (any_json, hello), mixed = outs[:n_other], outs[n_other:2 * n_other], outs[-5:-3], outs[-3:]
    for c in people:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), NESTED)
    for c in emails:
        assert re.fullmatch(EMAIL, c.text), c.text
    for c in sums:
        if c.finish_reason == "stop":  # a long sum may be cut by max_tokens
            assert ARITH_RE.match(c.text) and c.text.count("(") == c.text.count(")"), c.text
    if any_json.finish_reason == "stop":
        assert isinstance(json.loads(any_json.text), dict)
    assert hello.token_ids == [banana] * 3
    alone = [o.outputs[0].token_ids for o in llm.generate(free_prompts, free)]
    assert [c.token_ids for c in mixed] == alone


def test_bad_constraints_are_value_errors_before_any_page_is_taken(llm):
    engine = llm.engine
    free = engine.scheduler.num_free_pages
    with pytest.raises(ValueError, match="structured_outputs.regex does not compile"):
        engine.add_request("bad-regex", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    with pytest.raises(ValueError, match="logit_bias token ids"):
        engine.add_request("bad-bias", "hi", SamplingParams(logit_bias={10 ** 6: 1.0}))
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == free
    engine.add_request("prio", "hi", SamplingParams(priority=3))  # SamplingParams.priority reaches the scheduler
    engine.add_request("prio-arg", "hi", SamplingParams(priority=3), priority=1)
    assert [engine.requests[r].seqs[0].priority for r in ("prio", "prio-arg")] == [3, 1]
    engine.abort("prio")
    engine.abort("prio-arg")
    assert engine.scheduler.num_free_pages == free


@pytest.mark.parametrize("kw, match", [
    (dict(json={"type": "object"}, regex="a"), "exactly one"),
    (dict(), "exactly one"),
    (dict(json="[1"), "not valid JSON"),
    (dict(choice=[]), "non-empty list"),
    (dict(choice=["a", ""]), "non-empty strings"),
])
def test_structured_outputs_params_refuse_bad_input_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kw)


def test_structured_outputs_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="structured_outputs.whitespace_pattern is not supported"):
        StructuredOutputsParams.from_dict({"json": {}, "whitespace_pattern": " "})


def test_sampling_params_refuse_bad_logit_bias_and_priority():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="priority"):
        SamplingParams(priority="high")
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(temperature=0.0, use_beam_search=True, structured_outputs=StructuredOutputsParams(regex="a"))


def test_sampler_bitmask_and_logit_bias_stages():
    v, rows = 70, 3
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, v)), jnp.float32)
    mask = np.zeros((rows, 3), np.uint32)
    mask[0, 65 // 32] |= 1 << (65 % 32)          # row 0: only token 65
    mask[1, 0] = 0b1010                          # row 1: tokens 1 and 3
    mask[2, :] = 0xFFFFFFFF                      # row 2: free
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(2)] + [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0})]
    tensors = sampling.SamplingTensors.from_params(params, num_rows=4, vocab_size=v,
                                                   token_bitmask=np.vstack([mask, np.full((1, 3), 0xFFFFFFFF, np.uint32)]).view(np.int32))
    assert tensors.use_bitmask and tensors.use_logit_bias
    for step in range(8):
        out = sampling.sample(jnp.concatenate([logits, logits[:1]]), tensors, jnp.asarray([0, step], jnp.uint32))
        tokens = np.asarray(out.tokens)
        assert tokens[0] == 65 and tokens[1] in (1, 3) and tokens[2] == 7
    plain = sampling.SamplingTensors.from_params(params[:2], num_rows=4, vocab_size=v)
    assert not plain.use_bitmask and not plain.use_logit_bias and plain.token_bitmask.shape == (4, 0)
    with pytest.raises(ValueError, match="token_bitmask must be"):
        sampling.SamplingTensors.from_params(params, num_rows=4, vocab_size=v, token_bitmask=np.zeros((4, 2), np.int32))


def test_jpaged_generate_refuses_structured_outputs_by_name(llm):
    import jax

    from jpaged.generate import generate

    with pytest.raises(ValueError, match="structured_outputs is not supported by jpaged.generate"):
        generate(llm.engine.model, np.ones((1, 4), np.int32), np.array([4], np.int32), max_new_tokens=2,
                 sampling=SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")),
                 key=jax.random.PRNGKey(0))
