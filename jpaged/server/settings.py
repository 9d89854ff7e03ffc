"""ServerSettings: the HTTP server's address, limits and timeouts, checked once when built.

The engine's own knobs live in `jpaged.config.EngineConfig`; these are the server's (docs/server.md
describes each one's effect).
"""
from __future__ import annotations

import dataclasses

from jpaged.server.body_limit import DEFAULT_MAX_REQUEST_BYTES

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None              # every /v1 route needs `Authorization: Bearer <api_key>`
    served_model_name: str | None = None    # the `model` clients send; default the engine's model name
    max_pending_requests: int = 1024        # requests accepted at once; beyond it, 429
    max_n: int = 16                         # the largest `n` accepted
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies: 413
    max_tokens_limit: int | None = None     # the most tokens one completion may ask for (None: the context)
    shutdown_timeout: float = 30.0          # seconds running requests get to finish on SIGTERM
    engine_stall_timeout: float = 300.0     # a step longer than this: /health 503 and the engine's stack logged
    keep_alive_timeout: int = 5             # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16 << 10        # an unfinished request head buffering more than this: 400 from uvicorn
    warmup: bool = True                     # compile every step shape before /health answers 200
    warmup_variants: str = "all"            # "all" sampler tiers, or "plain" only (engine/step_variants.py)
    compilation_cache: bool = True          # keep compiled steps on disk so a restart is fast (serve only)
    stream_interval: float = 0.0            # seconds between a stream's writes at least (0: at every token)
    tool_call_parser: str | None = None     # hermes | llama3_json | mistral: parses tool calls (jpaged/server/tools.py)
    enable_auto_tool_choice: bool = False   # tool_choice "auto" allowed (needs tool_call_parser)

    def __post_init__(self):
        def positive(name: str, integer: bool = True):
            value = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")

        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535] (0: any free port), got {self.port!r}")
        for name in ("max_pending_requests", "max_n", "max_request_bytes", "keep_alive_timeout", "max_header_bytes"):
            positive(name)
        for name in ("shutdown_timeout", "engine_stall_timeout"):
            positive(name, integer=False)
        if self.warmup_variants not in ("all", "plain"):
            raise ValueError(f"warmup_variants must be 'all' or 'plain', got {self.warmup_variants!r}")
        if isinstance(self.stream_interval, bool) or not isinstance(self.stream_interval, (int, float)) \
                or not 0 <= self.stream_interval <= 10:
            raise ValueError(f"stream_interval must be in [0, 10] seconds, got {self.stream_interval!r}")
        if self.tool_call_parser is not None:
            from jpaged.server.tools import parser_named
            parser_named(self.tool_call_parser)
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        if self.max_tokens_limit is not None and (
                not isinstance(self.max_tokens_limit, int) or self.max_tokens_limit < COMPLETIONS_DEFAULT_MAX_TOKENS):
            raise ValueError(f"max_tokens_limit must be an integer >= {COMPLETIONS_DEFAULT_MAX_TOKENS} (the "
                             f"completions default), got {self.max_tokens_limit!r}")
