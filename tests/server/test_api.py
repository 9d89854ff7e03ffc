"""The OpenAI API over the fake engine, driven by the official `openai` client (and httpx for raw SSE).

Expected texts follow from the fake engine's rule: greedy output cycles through the prompt's bytes.
"""
from __future__ import annotations

import json

import pytest

from tests.server.conftest import HTTP, wait_until_idle

CHAT = [{"role": "user", "content": "hi"}]
CHAT_PROMPT = "<user>hi\n<assistant>"  # the fake template's rendering of CHAT


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["fake-model"]


def test_health_answers_ok(server):
    r = HTTP.get(server[0] + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion_of_a_string_prompt(client):
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, "abcabca", "length")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 7, 11)


@pytest.mark.parametrize("prompt, texts, prompt_tokens", [
    (["ab", "xyz"], ["abab", "xyzx"], 3 + 4),
    ([97, 98], ["abab"], 2),
    ([[97, 98], [120, 121, 122]], ["abab", "xyzx"], 5),
])
def test_completion_accepts_every_prompt_form(client, prompt, texts, prompt_tokens):
    r = client.completions.create(model="fake-model", prompt=prompt, max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == texts
    assert [c.index for c in r.choices] == list(range(len(texts)))
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 4 * len(texts)


def test_completion_without_model_uses_the_served_one(server):
    r = HTTP.post(server[0] + "/v1/completions", json={"prompt": "ab", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "fake-model" and r.json()["choices"][0]["text"] == "ab"


def test_completion_echo_prepends_the_prompt(client):
    r = client.completions.create(model="fake-model", prompt="abc", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text == "abcab"


def test_completion_stop_string_ends_with_finish_reason_stop(client):
    r = client.completions.create(model="fake-model", prompt="abcdef", max_tokens=10, temperature=0, stop=["cd"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("ab", "stop")
    assert r.usage.completion_tokens == 4


def test_completion_logprobs_in_legacy_format(client):
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "a"]
    assert lp.token_logprobs == [-0.5, -0.5, -0.5]
    assert lp.top_logprobs[1] == {"b": -0.5, "c": -1.0}
    assert lp.text_offset == [0, 1, 2]


def test_completion_echo_with_logprobs_scores_the_prompt(client):
    # Prompt tokens [BOS, a, b] (BOS decodes to ""); nothing predicts the first, so its logprobs are null.
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=2, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == "abab"
    assert c.logprobs.tokens == ["", "a", "b", "a", "b"]
    assert c.logprobs.token_logprobs == [None, -0.5, -0.5, -0.5, -0.5]
    assert c.logprobs.top_logprobs == [None] + [{t: -0.5} for t in "abab"]
    assert c.logprobs.text_offset == [0, 0, 1, 2, 3]
    chunks = list(client.completions.create(model="fake-model", prompt="ab", max_tokens=2, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for ch in chunks if ch.choices[0].logprobs for x in getattr(ch.choices[0].logprobs, field)]
        assert streamed == getattr(c.logprobs, field), field


def test_completion_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(client):
    # lm-eval-harness's loglikelihood request: echo + logprobs + max_tokens 0.
    r = client.completions.create(model="fake-model", prompt="ab", max_tokens=0, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    assert (c.text, c.finish_reason) == ("ab", "length")
    assert c.logprobs.tokens == ["", "a", "b"] and c.logprobs.token_logprobs == [None, -0.5, -0.5]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 0)
    chunks = list(client.completions.create(model="fake-model", prompt="ab", max_tokens=0, temperature=0,
                                            logprobs=1, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "ab"
    assert [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs] == \
        [None, -0.5, -0.5]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_max_tokens_0_without_echo_is_a_400_naming_max_tokens(server):
    r = HTTP.post(server[0] + "/v1/completions", json={"prompt": "ab", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_chat_completion_uses_the_chat_template(client):
    r = client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == CHAT_PROMPT[:6]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(CHAT_PROMPT), 6)


def test_chat_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=9, max_completion_tokens=3,
                                       temperature=0)
    assert r.usage.completion_tokens == 3


def test_chat_system_and_assistant_roles_reach_the_template(client):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "v"}]}]
    r = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=21, temperature=0)
    assert r.choices[0].message.content == "<system>s\n<user>u\n<as"


def test_chat_logprobs_with_top_logprobs(client):
    r = client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=2, temperature=0,
                                       logprobs=True, top_logprobs=2)
    first = r.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("<", -0.5, [60])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("<", -0.5), ("=", -1.0)]


def test_n2_returns_two_choices(client):
    r = client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=5, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(len(c.message.content) == 5 for c in r.choices)
    assert r.usage.completion_tokens == 10


def test_same_seed_reproduces_and_other_seed_differs(client):
    def sample(seed):
        r = client.completions.create(model="fake-model", prompt="abcdefghij", max_tokens=12, temperature=1.0,
                                      seed=seed, n=2)
        return [c.text for c in r.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_completion_stream_deltas_add_up_to_the_full_text(client):
    chunks = list(client.completions.create(model="fake-model", prompt="abc", max_tokens=7, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "abcabca"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_stream_with_stop_and_echo(client):
    chunks = list(client.completions.create(model="fake-model", prompt="abcdef", max_tokens=10, temperature=0,
                                            stop="cd", echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "abcdefab"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_n2_over_two_prompts_has_four_choices(client):
    chunks = list(client.completions.create(model="fake-model", prompt=["ab", "xy"], max_tokens=3, temperature=0,
                                            n=2, stream=True))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: "aba", 1: "aba", 2: "xyx", 3: "xyx"}


def test_chat_stream_starts_with_role_and_reports_usage_last(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_PROMPT[:6]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_logprobs_cover_every_token(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=1))
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(tokens) == CHAT_PROMPT[:6]


def test_raw_sse_ends_with_done(server):
    body = {"prompt": "ab", "max_tokens": 3, "temperature": 0, "stream": True}
    with HTTP.stream("POST", server[0] + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == "aba"


def test_metrics_count_requests_and_tokens_and_pages_return(server, client):
    client.completions.create(model="fake-model", prompt="abc", max_tokens=5, temperature=0)
    wait_until_idle(server[0])
    text = HTTP.get(server[0] + "/metrics").text
    for name in ("jpaged_requests_total", "jpaged_prompt_tokens_total", "jpaged_generation_tokens_total",
                 "jpaged_num_requests_running", "jpaged_num_requests_waiting", "jpaged_kv_pages_used",
                 "jpaged_kv_pages_free", "jpaged_prefix_cache_hit_rate", "jpaged_time_to_first_token_seconds_bucket",
                 "jpaged_inter_token_latency_seconds_bucket", "jpaged_num_preemptions_total"):
        assert name in text, name
    assert 'jpaged_requests_total{endpoint="completions",status="200"}' in text
