"""Every OpenAI chat and completion request field is honoured or refused by name (a 400 in OpenAI's
error shape naming it); unknown fields too. Runs on the fake engine: this is the API's contract."""
from __future__ import annotations

import pytest

from tests.server.conftest import HTTP, fake_server, wait_until_idle

MESSAGES = [{"role": "user", "content": "abc"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# field -> a value that uses it; every field of OpenAI's chat completion request.
CHAT_HONOURED = {
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"97": 5.0}, "logprobs": True,
    "max_tokens": 4, "max_completion_tokens": 4, "n": 2, "seed": 1, "stop": ["zz"], "stream": True,
    "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9, "user": "u",
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}},
    "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False, "metadata": {"k": "v"},
    "prompt_cache_key": "k", "safety_identifier": "s", "store": False, "service_tier": "auto",
    # vLLM's extras
    "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True, "priority": 1,
    "guided_regex": "[a-c]+",
}
CHAT_REFUSED = {
    "audio": {"voice": "alloy", "format": "mp3"}, "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "functions": [TOOL["function"]],
    "function_call": "auto", "store": True, "service_tier": "flex",
}
COMPLETION_HONOURED = {
    "best_of": 2, "echo": True, "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"97": 5.0},
    "logprobs": 1, "max_tokens": 4, "n": 2, "seed": 1, "stop": "zz", "stream": True,
    "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9, "user": "u",
    "guided_choice": ["a", "b"], "structured_outputs": {"regex": "[ab]"}, "response_format": {"type": "json_object"},
}
COMPLETION_REFUSED = {"suffix": "tail"}


@pytest.fixture(scope="module")
def url():
    with fake_server(max_n=4, max_model_len=2048, num_pages=4096) as (url, _):
        yield url


def _post(url, route, body):
    body = {"max_tokens": 2, **body} if "max_completion_tokens" not in body else body
    r = HTTP.post(url + route, json=body)
    return r, (r.json() if not body.get("stream") or r.status_code != 200 else None)


@pytest.mark.parametrize("field", sorted(CHAT_HONOURED))
def test_chat_field_is_honoured(url, field):
    body = {"messages": MESSAGES, field: CHAT_HONOURED[field]}
    if field == "stream_options":
        body["stream"] = True
    if field in ("parallel_tool_calls", "tools", "tool_choice"):
        body["tools"], body["tool_choice"] = [TOOL], "required"
    r, _ = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", sorted(CHAT_REFUSED))
def test_chat_field_is_refused_by_name(url, field):
    r, body = _post(url, "/v1/chat/completions", {"messages": MESSAGES, field: CHAT_REFUSED[field]})
    assert r.status_code == 400 and body["error"]["param"] == field, r.text
    assert f"'{field}'" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", sorted(COMPLETION_HONOURED))
def test_completion_field_is_honoured(url, field):
    body = {"prompt": "abc", field: COMPLETION_HONOURED[field]}
    if field == "stream_options":
        body["stream"] = True
    r, _ = _post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text


def test_completion_suffix_and_unknown_fields_are_refused_by_name(url):
    r, body = _post(url, "/v1/completions", {"prompt": "abc", **COMPLETION_REFUSED})
    assert r.status_code == 400 and body["error"]["param"] == "suffix", r.text
    for route, base in (("/v1/completions", {"prompt": "abc"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r, body = _post(url, route, {**base, "guided_decoding_backend": "xgrammar"})
        assert r.status_code == 400 and body["error"]["code"] == "unknown_field", r.text
        assert body["error"]["param"] == "guided_decoding_backend"
    r, body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a", "colour": "red"}]})
    assert r.status_code == 400 and body["error"]["param"] == "messages.0.colour", r.text
    wait_until_idle(url)


@pytest.mark.parametrize("body, param", [
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": " "}}, "structured_outputs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL]}, "tool_choice"),  # auto (the default) needs --enable-auto-tool-choice
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_constraint_and_tool_fields_are_400s_naming_them(url, body, param):
    r, out = _post(url, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert r.status_code == 400 and out["error"]["param"] == param, r.text


def test_tool_messages_are_accepted_in_the_history(url):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r, body = _post(url, "/v1/chat/completions", {"messages": history, "max_tokens": 3})
    assert r.status_code == 200 and body["choices"][0]["message"]["content"], r.text
