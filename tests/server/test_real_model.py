"""The real default model (SmolLM2-135M-Instruct) behind the server, driven by the openai client."""
from __future__ import annotations

import time

import openai
import pytest

from jpaged.config import EngineConfig
from jpaged.server import BackgroundServer, build_app
from tests.server.conftest import HTTP, wait_until_idle

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_server():
    from jpaged.engine.llm_engine import Engine

    config = EngineConfig(model="default", dtype="float32", num_kv_blocks=64, max_num_seqs=4,
                          max_num_batched_tokens=256, max_model_len=512)
    with BackgroundServer(build_app(lambda: Engine(config), warmup=False)) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_default_model_answers_paris_greedy_then_streaming(real_server):
    url, client = real_server
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10

    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    wait_until_idle(url, timeout=30)


@pytest.mark.parametrize("prompt, where", [([1, 49152], "prompt[1]"), ([-1], "prompt[0]"), ([2 ** 64], "prompt[0]")])
def test_default_model_refuses_token_ids_outside_its_vocabulary(real_server, prompt, where):
    url, _ = real_server
    r = HTTP.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token_id", r.text
    assert f"'{where}'" in r.json()["error"]["message"]


def test_default_model_refuses_a_prompt_too_big_to_fit_without_tokenizing_it(real_server):
    url, _ = real_server
    t0 = time.monotonic()
    r = HTTP.post(url + "/v1/completions", json={"prompt": "word " * (1 << 20)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert time.monotonic() - t0 < 2.0  # tokenizing 5 MiB would take seconds


def test_default_model_chat_without_max_tokens_may_use_the_whole_context(real_server):
    url, client = real_server
    r = client.chat.completions.create(model="default", messages=QUESTION, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 512
    wait_until_idle(url, timeout=30)
