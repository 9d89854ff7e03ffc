"""OpenAI wire format: pydantic request models, their SamplingParams, and response/chunk builders.

Requests are validated strictly (a string is not an integer); an unknown field is a 400 naming it, and
a known field this server does not implement is refused by name when set (`_UNSUPPORTED`). Responses are plain dicts in OpenAI's schema; `logprobs` take each endpoint's own shape
(legacy `tokens/token_logprobs/top_logprobs/text_offset` for completions, `content` for chat).
"""
from __future__ import annotations

import time
import random
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jpaged.outputs import CompletionOutput, Logprob
from jpaged.sampling_params import SamplingParams
from jpaged.structured.params import StructuredOutputsParams


class ApiError(Exception):
    """A client-visible failure, rendered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after  # seconds, sent as the Retry-After header (429, 503)

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the offending field."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    if first["type"] == "extra_forbidden":
        where = ".".join(str(p) for p in first["loc"])
        return ApiError(400, f"unknown field '{where}': this server does not implement it", param=where,
                        code="unknown_field")
    if first["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    if not first["loc"]:
        return ApiError(400, f"request body: {first['msg']}", code="invalid_type")
    param = str(first["loc"][0])
    same_field = [e for e in errors if e["loc"] and e["loc"][0] == first["loc"][0]]
    if len(same_field) > 1:  # a union field: no member matched; name the deepest common location
        common = _common_prefix([e["loc"] for e in same_field])
        where = ".".join(str(p) for p in common)
        named = [p for p in common if isinstance(p, str)]
        message = f"'{where}' has an invalid type or value: {_field_types(named[-1])}"
    else:
        where = ".".join(str(p) for p in first["loc"])
        message = f"'{where}': {first['msg']}"
    return ApiError(400, message, param=param, code="invalid_value")


def _common_prefix(locs: list[tuple]) -> tuple:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _field_types(param: str) -> str:
    return {"prompt": "expected a string, a list of strings, a list of token ids or a list of token-id lists",
            "stop": "expected a string or a list of strings",
            "content": "expected a string or a list of text parts"}.get(param, "see the API reference")


class _Strict(BaseModel):
    # allow_inf_nan=False: JSON's Infinity / NaN (and numbers too large for a float) are refused by name.
    # extra="forbid": an unknown field is refused by name, never silently dropped.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    # Known fields this server does not implement: name -> the values that mean "not used" (accepted).
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    def refuse_unsupported(self) -> None:
        for name, accepted in self._UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in accepted:
                raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_field")


# Bounds the engine's SamplingParams does not set itself: OpenAI's temperature range, and seeds that
# fit the int64 the API documents.
MAX_TEMPERATURE = 2.0
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None  # constrained decoding always holds to the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _constraint_sources(req) -> list[tuple[str, StructuredOutputsParams]]:
    """(field, constraint) for each constraint field the request sets."""
    found = []

    def add(name, **kw):
        try:
            found.append((name, StructuredOutputsParams(**kw)))
        except ValueError as e:
            raise ApiError(400, f"'{name}': {e}", param=name, code="invalid_value") from None

    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        add("response_format", json_object=True)
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "'response_format.json_schema.schema' is required for type json_schema",
                           param="response_format", code="invalid_value")
        add("response_format", json=rf.json_schema.schema_)
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            add(name, **{kind: getattr(req, name)})
    if req.structured_outputs is not None:
        try:
            found.append(("structured_outputs", StructuredOutputsParams.from_dict(req.structured_outputs)))
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"'structured_outputs': {e}", param="structured_outputs", code="invalid_value") from None
    return found


class _SamplingFields(_Strict):
    """Fields both endpoints share; `sampling_params` maps them onto the engine's SamplingParams."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, which benchmarks use to fix output lengths
    ignore_eos: bool = False
    min_tokens: int = 0
    # Structured outputs (OpenAI's response_format; vLLM's guided_* and structured_outputs), logit_bias,
    # priority (vLLM's; lower runs first under --scheduling-policy priority).
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0

    def constraint(self, forced: tuple[str, StructuredOutputsParams] | None = None
                   ) -> StructuredOutputsParams | None:
        """The request's one constraint (`forced`: a tool_choice's); 400 naming the fields when several."""
        sources = _constraint_sources(self) + ([forced] if forced is not None else [])
        if len(sources) > 1:
            names = [name for name, _ in sources]
            raise ApiError(400, f"'{names[1]}' cannot be combined with '{names[0]}': one output constraint per "
                           "request", param=names[1], code="invalid_value")
        return sources[0][1] if sources else None

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if not key.isdigit():
                raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias",
                               code="invalid_value")
            if not -SamplingParams.MAX_LOGIT_BIAS <= bias <= SamplingParams.MAX_LOGIT_BIAS:
                raise ApiError(400, f"'logit_bias' values must be in [-100, 100], got {bias} for {key}",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = float(bias)
        return out

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None, *,
                best_of: int | None = None, forced=None, skip_special_tokens: bool = True) -> SamplingParams:
        def given(value, default):
            return default if value is None else value

        self.refuse_unsupported()
        constraint = self.constraint(forced)
        logit_bias = self._logit_bias()
        if self.temperature is not None and not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ApiError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}",
                           param="temperature", code="invalid_value")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ApiError(400, f"seed must be a 64-bit signed integer, got {self.seed}", param="seed",
                           code="invalid_value")
        try:
            return SamplingParams(
                n=self.n, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
                top_k=given(self.top_k, -1), min_p=given(self.min_p, 0.0), stop=self.stop, seed=self.seed,
                presence_penalty=given(self.presence_penalty, 0.0),
                frequency_penalty=given(self.frequency_penalty, 0.0),
                repetition_penalty=given(self.repetition_penalty, 1.0), max_tokens=max_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                best_of=best_of, structured_outputs=constraint, logit_bias=logit_bias, priority=self.priority,
                skip_special_tokens=skip_special_tokens)
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: Any = None

    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {"suffix": (None, "")}

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of engine prompts (text or token ids), one per request."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
        for item in p:
            if len(item) == 0:
                raise ApiError(400, "'prompt' must not contain an empty prompt", param="prompt",
                               code="invalid_value")
        return list(p)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: score the prompt, generate nothing (lm-eval's loglikelihood requests)."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        # echo with logprobs scores the prompt too (OpenAI's legacy completions; vLLM's prompt_logprobs).
        # echo_only runs one token, as vLLM does, and the response leaves it out.
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 is accepted only with echo, to score the prompt)",
                           param="max_tokens", code="invalid_value")
        max_tokens = 1 if self.echo_only else self.max_tokens
        return self._params(max_tokens, self.logprobs, self.logprobs if self.echo else None, best_of=self.best_of)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallMessage(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant
    tool_call_id: str | None = None                  # tool

    def template_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # calls forced by tool_choice always hold to the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Accepted, no effect on the output: identifiers and hints for OpenAI's own services.
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused by name when set (see _UNSUPPORTED).
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    service_tier: Any = None

    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
        "verbosity": (None,), "web_search_options": (None,), "functions": (None,), "function_call": (None,),
        "store": (None, False), "service_tier": (None, "auto", "default")}

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def effective_tool_choice(self):
        """OpenAI's default: "auto" with tools, "none" without; a named choice as a dict."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def sampling_params(self, *, forced=None, skip_special_tokens: bool = True) -> SamplingParams:
        """`forced`: (field, constraint) a tool_choice imposes (jpaged/server/tools.py)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs",
                           code="invalid_value")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= SamplingParams.MAX_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be in [0, {SamplingParams.MAX_LOGPROBS}], got {self.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, forced=forced,
                            skip_special_tokens=skip_special_tokens)


# -- responses -----------------------------------------------------------------------------------


# Ids need to be unique, not secret: one generator seeded from the OS, instead of a system call per id.
_ids = random.Random()


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ids.getrandbits(128):032x}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, max_model_len: int | None = None) -> dict:
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "jpaged"}
    return card if max_model_len is None else {**card, "max_model_len": max_model_len}


def model_list(name: str, max_model_len: int | None = None) -> dict:
    return {"object": "list", "data": [model_card(name, max_model_len)]}


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: `prompt` text, or chat `messages` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _token_text(entry: dict[int, Logprob], token_id: int) -> str:
    return entry[token_id].decoded_token or ""


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob] | None], text_offset: int,
                        decode: Callable[[list[int]], str] | None = None) -> dict:
    """Legacy completions format; `top_logprobs` holds the sampled token and the top-k alternatives.

    An entry of None (an echoed prompt's first token, which nothing predicts) gives null logprobs, as
    OpenAI's API does, and takes its text from `decode`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            text = decode([token_id]) if decode is not None else ""
            token_logprobs.append(None)
            tops.append(None)
        else:
            text = _token_text(entry, token_id)
            token_logprobs.append(entry[token_id].logprob)
            tops.append({lp.decoded_token or "": lp.logprob for lp in entry.values()})
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echoed_logprobs(prompt: dict | None, completion: dict) -> dict:
    """The echoed prompt's logprobs (completion_logprobs from offset 0) followed by the completion's."""
    return completion if prompt is None else {key: prompt[key] + completion[key] for key in completion}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top: int) -> dict:
    """Chat format: one item per sampled token with its `top` most likely alternatives by rank."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, entries):
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top),
                        key=lambda lp: lp.rank)
        content.append({**item(_token_text(entry, token_id), entry[token_id].logprob),
                        "top_logprobs": [item(lp.decoded_token or "", lp.logprob) for lp in ranked]})
    return {"content": content}


class ChoiceDelta:
    """What one choice gained since the last chunk: cumulative engine outputs turned into deltas."""

    def __init__(self):
        self.num_tokens = 0
        self.text_len = 0
        self.finished = False

    def advance(self, out: CompletionOutput) -> tuple[str, list[int], list[dict[int, Logprob]]]:
        n = len(out.token_ids)
        text = out.text[self.text_len:]
        token_ids = out.token_ids[self.num_tokens:n]
        entries = (out.logprobs or [])[self.num_tokens:n]
        self.num_tokens, self.text_len = n, len(out.text)
        self.finished = out.finish_reason is not None
        return text, token_ids, entries
