"""The LoRA routes of the server with the official openai client: `model` selects an adapter,
/v1/models lists them, and adapters load and unload at run time."""
import openai
import pytest

from jpaged.server import BackgroundServer, build_app
from tests.engine.conftest import ByteTokenizer
from tests.lora.conftest import NEW_TOKENS, PROMPT
from tests.server.conftest import HTTP

TEXT = ByteTokenizer().decode


@pytest.fixture(scope="module")
def server(lora_engine):
    """The shared engine (adapters a1.. registered, none of them named "late") behind a server."""
    app = build_app(lambda: lora_engine, warmup=False)
    with BackgroundServer(app) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert r.model == model
    return r.choices[0].text


def test_model_name_selects_the_adapter_and_models_lists_it(server, merged_greedy):
    _, client = server
    models = client.models.list().data
    assert [m.id for m in models][:3] == ["test", "a1", "a2"] and models[1].parent == "test"
    assert complete(client, "a1") == TEXT(merged_greedy[1])
    assert complete(client, "test") == TEXT(merged_greedy[0])
    assert complete(client, "a2") == TEXT(merged_greedy[2])
    with pytest.raises(openai.NotFoundError, match="'test', 'a1', 'a2'"):
        complete(client, "a9")


def test_adapters_load_and_unload_at_run_time(server, lora_requests, merged_greedy):
    # The same adapter files as a4 under another name and id: the same output.
    url, client = server
    listed = [m.id for m in client.models.list().data]
    r = HTTP.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": lora_requests[3].lora_path})
    assert r.status_code == 200, r.text
    assert complete(client, "late") == TEXT(merged_greedy[4])
    assert [m.id for m in client.models.list().data] == [*listed, "late"]
    again = HTTP.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "/elsewhere"})
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_exists"
    bad = HTTP.post(url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert HTTP.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert [m.id for m in client.models.list().data] == listed
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    gone = HTTP.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "lora_not_found"
