"""Property tests: request bodies drawn from the API's own pydantic models (their JSON schema, with
wrong-typed and out-of-range values mixed in) never get a 5xx, and every answer matches its schema:
OpenAI's error JSON, a Completion / ChatCompletion, or a stream of chunks that ends with [DONE].
Streamed deltas always add up to the cumulative output.

The default profile is short (CI); the slow-marked test runs the long one.
"""
from __future__ import annotations

import json
from typing import Literal

import openai.types as ot
import openai.types.chat as oc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpaged.outputs import CompletionOutput, Logprob
from jpaged.server.protocol import ChatCompletionRequest, ChoiceDelta, CompletionRequest
from tests.server.conftest import HTTP, wait_until_idle

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=6)
EDGE_INTS = st.sampled_from([-(2 ** 70), -(2 ** 63) - 1, -1, 0, 1, 2, 257, 258, 2 ** 31, 2 ** 63, 2 ** 70])
EDGE_FLOATS = st.sampled_from([-1e308, -2.0, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 2.0000001, 1e308])


def from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values valid for a pydantic JSON schema (the subset our models use), leaning on edge values."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind is None:  # Any
        return JSON_VALUES
    if kind == "integer":
        return st.integers(-2, 40) | EDGE_INTS
    if kind == "number":
        return st.floats(-3, 3, allow_nan=False) | EDGE_FLOATS
    if kind == "string":
        return st.text(max_size=8)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema["items"], defs), min_size=schema.get("minItems", 0), max_size=4)
    if kind == "object" and "properties" not in schema:  # a dict of str keys
        values = schema.get("additionalProperties")
        return st.dictionaries(st.text(max_size=4), from_schema(values, defs) if isinstance(values, dict)
                               else JSON_VALUES, max_size=2)
    if kind == "object":
        return objects(schema, defs)
    raise ValueError(f"from_schema: unsupported schema {schema}")


def objects(schema: dict, defs: dict) -> st.SearchStrategy:
    """Every required property, a subset of the others; now and then one of them holds any JSON value."""
    props = schema["properties"]
    required = set(schema.get("required", ()))
    fields = {name: from_schema(s, defs) for name, s in props.items()}

    @st.composite
    def build(draw):
        names = sorted(required | set(draw(st.lists(st.sampled_from(sorted(props)), max_size=6))))
        body = {name: draw(fields[name]) for name in names}
        if names and draw(st.integers(0, 4)) == 0:
            body[draw(st.sampled_from(names))] = draw(JSON_VALUES)
        return body

    return build()


def body_strategy(model) -> st.SearchStrategy:
    schema = model.model_json_schema()
    return objects(schema, schema.get("$defs", {}))


BODIES = st.one_of(st.tuples(st.just("/v1/completions"), body_strategy(CompletionRequest)),
                   st.tuples(st.just("/v1/chat/completions"), body_strategy(ChatCompletionRequest)))


class _CompletionChunkChoice(ot.CompletionChoice):
    finish_reason: Literal["stop", "length", "content_filter"] | None = None  # null until the last chunk


class CompletionChunk(ot.Completion):
    """A streamed completion chunk: the SDK's Completion, whose finish_reason may be null mid-stream."""

    choices: list[_CompletionChunkChoice]


def check_error(error: dict) -> None:
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def check_answer(url: str, path: str, body: dict) -> None:
    """Sends `body`; asserts no 5xx and that the answer matches its schema."""
    chat = path.endswith("chat/completions")
    with HTTP.stream("POST", url + path, json=body) as r:
        raw = r.read()
    assert r.status_code < 500, raw
    if r.status_code != 200:
        check_error(json.loads(raw)["error"])
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            if event.startswith('{"error"'):
                check_error(json.loads(event)["error"])
            else:
                (oc.ChatCompletionChunk if chat else CompletionChunk).model_validate_json(event)
        return
    (oc.ChatCompletion if chat else ot.Completion).model_validate_json(raw)


def _fuzz(server, path_body):
    check_answer(server[0], *path_body)


FUZZ_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
test_schema_bodies_get_no_5xx_and_schema_shaped_answers = settings(
    max_examples=40, deadline=None, suppress_health_check=FUZZ_CHECKS)(given(path_body=BODIES)(_fuzz))
test_schema_bodies_long_profile = pytest.mark.slow(pytest.mark.long(  # 1,000 fuzz examples
    settings(max_examples=1000, deadline=None, suppress_health_check=FUZZ_CHECKS)(given(path_body=BODIES)(_fuzz))))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(sorted(CompletionRequest.model_fields) + ["messages"]), JSON_VALUES,
                            max_size=6),
       chat=st.booleans())
def test_any_json_body_gets_200_or_an_openai_4xx(server, body, chat):
    check_answer(server[0], "/v1/chat/completions" if chat else "/v1/completions", body)


def test_fuzzing_left_the_server_idle(server):
    wait_until_idle(server[0])


@given(st.lists(st.text(max_size=3), min_size=1, max_size=8), st.data())
def test_deltas_concatenate_to_the_cumulative_output(pieces, data):
    delta, text, ids, streamed, streamed_ids, logprobs = ChoiceDelta(), "", [], "", [], []
    for i, piece in enumerate(pieces):
        text += piece
        new = data.draw(st.integers(0, 3))
        ids += list(range(len(ids), len(ids) + new))
        logprobs += [{t: Logprob(-1.0, 1, "x")} for t in range(len(logprobs), len(ids))]
        last = i == len(pieces) - 1
        out = CompletionOutput(0, text, list(ids), logprobs=logprobs, finish_reason="stop" if last else None)
        d_text, d_ids, d_entries = delta.advance(out)
        assert len(d_entries) == len(d_ids)
        streamed += d_text
        streamed_ids += d_ids
    assert (streamed, streamed_ids, delta.finished) == (text, ids, True)
