"""Tool calling for /v1/chat/completions: tool definitions into the prompt, tool calls out of the text.

What each `tool_choice` does (vLLM's semantics):
  none      tools are shown to the model, its text is returned as content;
  auto      the text is parsed by the server's `--tool-call-parser` (needs `--enable-auto-tool-choice`);
  required  the output is constrained to a JSON array of {"name", "parameters"} objects, one of the
            tools each (a grammar, jpaged/structured), and every item becomes a tool call;
  named     ({"type": "function", "function": {"name": N}}) the output is constrained to N's parameters
            schema and becomes one call of N.
Tools reach the model through the chat template's `tools=`; a template that never mentions tools gets
them as a Hermes-style system message instead, and its history's tool calls and tool results are
rewritten into the same Hermes text (`<tool_call>` / `<tool_response>`), so any model can be asked.
Parsers: `hermes` (Hermes, Qwen: `<tool_call>{json}</tool_call>`), `llama3_json` (Llama 3.x: a JSON
object with "name" and "parameters", after an optional `<|python_tag|>`, several joined by ";"),
`mistral` (`[TOOL_CALLS] [{"name", "arguments"}, ...]`).
"""
from __future__ import annotations

import abc
import dataclasses
import json
import random
import re

from jpaged.structured.params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json", "mistral")
_ids = random.Random()


def new_call_id() -> str:
    return f"call_{_ids.getrandbits(96):024x}"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire format)
    id: dataclasses.InitVar[str | None] = None

    def __post_init__(self, id):
        self.call_id = id or new_call_id()

    def wire(self, index: int | None = None) -> dict:
        out = {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _args_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value if value is not None else {}, ensure_ascii=False)


def _call_from(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], _args_text(args))


def _json_values(text: str) -> list:
    """Every top-level JSON value in `text`, in order (separators and junk between them skipped)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            break
        try:
            value, end = decoder.raw_decode(text, j)
        except json.JSONDecodeError:
            i = j + 1
            continue
        out.append(value)
        i = end
    return out


class ToolParser(abc.ABC):
    """Splits a model's text into (content, tool calls); `marker` starts a call in the text."""

    name = ""
    marker = ""
    skip_special_tokens = True  # False where the marker is a special token the text must keep

    @abc.abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the text outside tool calls or None, the calls), each call's arguments a JSON string."""

    def call_start(self, text: str) -> int:
        """Where a tool call starts in `text` (len(text) when none has): content streams up to here."""
        i = text.find(self.marker)
        return i if i >= 0 else len(text)


class HermesParser(ToolParser):
    name, marker = "hermes", "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        start = text.find(self.marker)
        if start < 0:
            return text, []
        calls = [c for body in self._call.findall(text) for v in _json_values(body)[:1]
                 if (c := _call_from(v, "arguments")) is not None]
        if not calls:
            return text, []
        return (text[:start].strip() or None), calls


class Llama3JsonParser(ToolParser):
    name, marker = "llama3_json", "<|python_tag|>"
    skip_special_tokens = False

    def call_start(self, text):
        stripped = text.lstrip()
        if stripped.startswith(self.marker) or stripped.startswith("{"):
            return 0
        return len(text)

    def parse(self, text):
        body = text.strip()
        if body.startswith(self.marker):
            body = body[len(self.marker):]
        if not body.lstrip().startswith("{"):
            return text, []
        calls = [c for v in _json_values(body) if (c := _call_from(v, "parameters")) is not None]
        return (None, calls) if calls else (text, [])


class MistralParser(ToolParser):
    name, marker = "mistral", "[TOOL_CALLS]"
    skip_special_tokens = False

    def parse(self, text):
        start = text.find(self.marker)
        if start < 0:
            return text, []
        calls = []
        for v in _json_values(text[start + len(self.marker):]):
            for item in v if isinstance(v, list) else [v]:
                if (c := _call_from(item, "arguments")) is not None:
                    calls.append(c)
        return ((text[:start].strip() or None), calls) if calls else (text, [])


def parser_named(name: str) -> ToolParser:
    table = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
    if name not in table:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {name!r}")
    return table[name]()


# -- requests -------------------------------------------------------------------------------------


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict]) -> dict:
    """tool_choice "required": a non-empty JSON array of calls, each naming one tool with its parameters."""
    items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": items}}


def forced_constraint(tools: list[dict], choice) -> StructuredOutputsParams | None:
    """The grammar that enforces a "required" or named tool_choice (None for "none" and "auto")."""
    if choice == "required":
        return StructuredOutputsParams(json=required_schema(tools))
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredOutputsParams(json=_parameters(tool))
    return None


def forced_calls(text: str, tools: list[dict], choice) -> list[ToolCall]:
    """The calls of a constrained ("required" or named) output; [] when it is not valid JSON (cut by
    max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if isinstance(choice, dict):
        return [ToolCall(choice["function"]["name"], _args_text(value))]
    return [c for item in value if (c := _call_from(item, "parameters")) is not None]


def template_mentions_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def hermes_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            "query. Here are the available tools: <tools>\n" + listing + "\n</tools>\n"
            "For each function call return a JSON object with the function name and arguments within "
            "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def plain_history(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows no tools: the tools as a system message, assistant
    tool calls and tool results as Hermes-tagged text."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": _loads_or_text(c["function"]["arguments"])},
                                                           ensure_ascii=False) + "\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        system = hermes_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _loads_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments


class ToolCallStream:
    """A streamed choice's text split into content deltas and, at the end, tool_calls deltas.

    Content streams until a tool call may have started (the parser's marker, or a prefix of it at the
    end of the text, is held back); the calls are parsed once the choice has finished. Constrained
    ("required"/named) choices hold all their text: it is the calls' JSON."""

    def __init__(self, parser: ToolParser | None, tools: list[dict], choice):
        self.parser, self.tools, self.choice = parser, tools, choice
        self.sent = 0  # characters of content sent

    def content_delta(self, text: str) -> str:
        if self.parser is None:  # a constrained choice
            return ""
        end = self.parser.call_start(text)
        marker = self.parser.marker
        if end == len(text):  # hold back a tail that may be the marker's beginning
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if marker.startswith(text[-k:]):
                    end = len(text) - k
                    break
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls) for the finished text."""
        if self.parser is None:
            calls = forced_calls(text, self.tools, self.choice)
            return ("" if calls else text[self.sent:]), calls
        content, calls = self.parser.parse(text)
        if not calls:
            return text[self.sent:], []
        content = content or ""
        return content[self.sent:] if len(content) > self.sent else "", calls


@dataclasses.dataclass
class ToolPlan:
    """What a chat request's tools mean for its prompt, its sampling and its answer."""

    tools: list[dict] | None
    choice: str | dict       # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parser: ToolParser | None  # reads calls out of free text ("auto")
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> tuple[str, StructuredOutputsParams] | None:
        constraint = forced_constraint(self.tools or [], self.choice) if self.tools else None
        return ("tool_choice", constraint) if constraint is not None else None

    @property
    def skip_special_tokens(self) -> bool:
        return self.parser is None or self.choice != "auto" or self.parser.skip_special_tokens

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.parser if self.choice == "auto" else None, self.tools or [], self.choice)

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished choice."""
        if not self.parses:
            return text, []
        if self.choice == "auto":
            content, calls = self.parser.parse(text)
        else:
            calls = forced_calls(text, self.tools, self.choice)
            content = None if calls else text
        return content, (calls if self.parallel else calls[:1])


def plan_for(req, parser_name: str | None, auto_enabled: bool) -> ToolPlan:
    """The ToolPlan of a ChatCompletionRequest; ApiError naming the field for a choice it cannot honour."""
    from jpaged.server.protocol import ApiError

    tools = req.tool_dicts()
    choice = req.effective_tool_choice
    if req.tool_choice is not None and not tools and choice != "none":
        raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice", code="invalid_value")
    if isinstance(choice, dict) and choice["function"]["name"] not in tool_names(tools):
        raise ApiError(400, f"'tool_choice' names function {choice['function']['name']!r}, which is not in "
                       f"'tools' ({', '.join(tool_names(tools))})", param="tool_choice", code="invalid_value")
    if tools and choice == "auto" and not (auto_enabled and parser_name):
        raise ApiError(400, "tool_choice 'auto' (the default with tools) needs the server to run with "
                       "--enable-auto-tool-choice and --tool-call-parser; use 'required', a named function or "
                       "'none'", param="tool_choice", code="invalid_value")
    parser = parser_named(parser_name) if parser_name else None
    return ToolPlan(tools, choice, parser, req.parallel_tool_calls)
