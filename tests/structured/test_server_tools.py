"""The official openai client against the real server on the default model: response_format, tools
(auto, required, named), streamed tool-call deltas, a multi-turn with a tool result, /tokenize and
/v1/models. A 135M model's tool use is weak: these assert structure, not wisdom."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from jpaged.config import EngineConfig
from jpaged.server import BackgroundServer, build_app
from tests.server.conftest import HTTP, wait_until_idle

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def real_server():
    from jpaged.engine.llm_engine import Engine

    # Few step shapes (a 64-token budget, 64-token pages): few compilations.
    config = EngineConfig(model="default", dtype="float32", block_size=64, num_kv_blocks=64, max_num_seqs=4,
                          max_num_batched_tokens=64, max_model_len=1024)
    app = build_app(lambda: Engine(config), warmup=False, tool_call_parser="hermes", enable_auto_tool_choice=True)
    with BackgroundServer(app) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _args(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.long
def test_tool_choice_required_and_named(real_server):
    url, client = real_server
    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, temperature=1.0, seed=2,
                                       tools=[WEATHER, TIME], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        _args(call, WEATHER if call.function.name == "get_weather" else TIME)

    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=60, temperature=1.0, seed=3,
                                       tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    _args(call, TIME)
    wait_until_idle(url, timeout=30)


def test_json_schema_then_streamed_tool_call_deltas(real_server):
    url, client = real_server
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=64, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    chunks = list(client.chat.completions.create(
        model="default", messages=ASK, max_tokens=60, temperature=1.0, seed=4, stream=True,
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = d.id or entry["id"]
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    (call,) = calls.values()
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])

    wait_until_idle(url, timeout=30)


@pytest.mark.long
def test_a_tool_result_continues_the_chat(real_server):
    url, client = real_server
    call = {"id": "call_0", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    r = client.chat.completions.create(model="default", messages=history, max_tokens=8, temperature=0,
                                       tools=[WEATHER], tool_choice="auto")
    message = r.choices[0].message
    assert message.content or message.tool_calls  # auto: either is a valid answer
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    wait_until_idle(url, timeout=30)


def test_tokenize_detokenize_and_models_report_max_model_len(real_server):
    url, client = real_server
    r = HTTP.post(url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["count"] == len(r["tokens"]) >= 2 and r["max_model_len"] == 1024
    assert HTTP.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = HTTP.post(url + "/tokenize", json={"messages": ASK}).json()
    assert chat["count"] > r["count"]
    assert client.models.list().data[0].model_extra["max_model_len"] == 1024
