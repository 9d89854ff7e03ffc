"""The real default model (SmolLM2-135M-Instruct) behind the server, driven by the openai client."""
from __future__ import annotations

import openai
import pytest

from jpaged.config import EngineConfig
from jpaged.server import BackgroundServer, build_app
from tests.server.conftest import wait_until_idle

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_server():
    from jpaged.engine.llm_engine import Engine

    config = EngineConfig(model="default", dtype="float32", num_kv_blocks=64, max_num_seqs=4,
                          max_num_batched_tokens=256, max_model_len=512)
    with BackgroundServer(build_app(lambda: Engine(config))) as url:
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
