"""Property tests: any JSON body gets 200 or a 4xx in OpenAI's error format (never a 500), and
streamed deltas always add up to the cumulative output."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jpaged.outputs import CompletionOutput, Logprob
from jpaged.server.protocol import ChoiceDelta
from tests.server.conftest import HTTP, wait_until_idle

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-3, 3, allow_nan=False),
                   st.text(max_size=8), st.lists(st.integers(-1, 300), max_size=4),
                   st.lists(st.text(max_size=4), max_size=3))
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs",
          "echo", "stream", "presence_penalty", "frequency_penalty", "repetition_penalty", "model", "user",
          "messages", "top_logprobs", "max_completion_tokens"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, chat=st.booleans())
def test_any_body_gets_200_or_an_openai_4xx(server, body, chat):
    url = server[0]
    r = HTTP.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body)
    if r.status_code == 200:
        return
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


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
