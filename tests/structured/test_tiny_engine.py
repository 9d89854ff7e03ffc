"""The engine under constraints on a tiny random model with a byte vocabulary (fast): sampled outputs at
temperature 1 all match their JSON schema, regex or grammar, and seeded unconstrained requests batched
beside them give the tokens they give alone."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jpaged import SamplingParams
from jpaged.structured import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["kind", "n", "tags"], "additionalProperties": False}
REGEX = r"[a-c]{2,4}-[0-9]{1,2}"
GRAMMAR = 'start: "(" item ("," item)* ")"\nitem: "x" | "y" | start'


@pytest.fixture(scope="module")
def llm():
    from jpaged import LLM
    from jpaged.loader.tokenizer import byte_tokenizer
    from tests.multihost.greedy import tiny_model

    return LLM("tiny", model_obj=tiny_model("kv8"), tokenizer=byte_tokenizer(eos_token_ids=[2], vocab_size=256),
               dtype="float32", block_size=16, num_kv_blocks=128, max_num_seqs=16, max_num_batched_tokens=64,
               max_model_len=128)


def test_constrained_outputs_validate_and_unconstrained_neighbours_are_unchanged(llm):
    json_p = SamplingParams(temperature=1.0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    regex_p = SamplingParams(temperature=1.0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=REGEX))
    grammar_p = SamplingParams(temperature=1.0, max_tokens=40, structured_outputs=StructuredOutputsParams(grammar=GRAMMAR))
    free = [SamplingParams(temperature=1.0, max_tokens=10, seed=s) for s in (1, 2, 3)]
    free_prompts = [[40 + i, 41, 42, 43] for i in range(3)]
    prompts = [[50 + i, 60, 70] for i in range(12)] + free_prompts
    params = [json_p] * 6 + [regex_p] * 3 + [grammar_p] * 3 + free
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    for c in outs[:6]:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    for c in outs[6:9]:
        assert re.fullmatch(REGEX, c.text), c.text
    for c in outs[9:12]:
        if c.finish_reason == "stop":  # deep nesting may be cut by max_tokens
            assert re.fullmatch(r"[(),xy]+", c.text) and c.text.count("(") == c.text.count(")"), c.text
    alone = [o.outputs[0].token_ids for o in llm.generate(free_prompts, free)]
    assert [c.token_ids for c in outs[12:]] == alone
