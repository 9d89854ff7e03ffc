"""StructuredOutputsParams: one constraint on a request's output (vLLM's names), as llguidance grammar text.

Exactly one kind per request: `json` (a JSON schema, dict or string), `json_object` (any JSON object),
`regex`, `choice` (one of a list of strings) or `grammar` (Lark, or llama.cpp's GBNF/EBNF). Checking
that the constraint compiles against the model's tokenizer happens in `grammar.Constraints`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON is written compactly (", " and ": ", no free whitespace), as vLLM does: a sampled model otherwise
# spends tokens on runs of newlines and spaces the grammar would allow.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def import_llguidance():
    """llguidance, imported on first use: jpaged runs without it until a request asks for a constraint."""
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise ValueError("structured outputs need the llguidance package (pip install llguidance)") from None
    return llguidance


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or str), got "
                             f"{type(self.json).__name__}")
        if self.json_object is not True and self.json_object is not False:
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {list(self.choice)!r}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """Hashable identity of the constraint: requests with equal keys share one compiled grammar."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        return self.kind, value

    def to_grammar(self) -> str:
        """The constraint as llguidance grammar text (not yet checked: grammar.Constraints does that)."""
        llguidance = import_llguidance()
        kind = self.kind
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else self.json
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        if kind == "regex":
            return llguidance.grammar_from("regex", self.regex)
        return llguidance.grammar_from("grammar", self.grammar)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "StructuredOutputsParams":
        """From vLLM's `structured_outputs` request object; an unknown key is refused by name."""
        if not isinstance(fields, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(fields).__name__}")
        unknown = sorted(set(fields) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs.{unknown[0]} is not supported (supported: {', '.join(KINDS)})")
        return cls(**fields)
