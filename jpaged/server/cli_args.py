"""`jpaged serve`'s own flags (the engine's come from jpaged/cli.py) and the ServerSettings they make."""
from __future__ import annotations

import argparse

from jpaged.server.settings import ServerSettings

_DEFAULTS = ServerSettings()


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port to listen on (default {d.port})")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--max-pending-requests", type=int, default=d.max_pending_requests,
                        help=f"requests accepted at once (running + waiting); beyond it, 429 (default "
                        f"{d.max_pending_requests})")
    parser.add_argument("--max-n", type=int, default=d.max_n,
                        help=f"largest n a request may ask for (default {d.max_n})")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="largest request body; beyond it, 413 (default 8 MiB)")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="most tokens one completion may ask for: a larger max_tokens is a 400, and chat's "
                        "default (the context left after the prompt) is capped to it (default: no cap)")
    parser.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                        help="seconds running requests get to finish on SIGTERM before they are ended with an "
                        f"error (default {d.shutdown_timeout:g})")
    parser.add_argument("--engine-stall-timeout", type=float, default=d.engine_stall_timeout,
                        help="seconds one engine step may take while work waits; beyond it /health answers 503 "
                        f"and the log shows the engine thread's stack (default {d.engine_stall_timeout:g})")
    parser.add_argument("--keep-alive-timeout", type=int, default=d.keep_alive_timeout,
                        help=f"seconds an idle keep-alive connection stays open (default {d.keep_alive_timeout})")
    parser.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                        help="most bytes an unfinished request head may buffer; beyond it, 400 and the connection "
                        "closes (default 16 KiB)")
    parser.add_argument("--stream-interval", type=float, default=d.stream_interval,
                        help="seconds between a stream's writes at least; each write then carries every token "
                        "of that time, which cuts the server's cost per token under load at the price of "
                        "coarser streaming (default 0: write as soon as a token is there)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=d.warmup,
                        help="compile every step shape (the engine's warmup()) before serving; until it is done "
                        "/health and the API answer 503 'engine_starting' (default on)")
    parser.add_argument("--warmup-variants", choices=("all", "plain"), default=d.warmup_variants,
                        help="which step shapes the warm-up compiles: 'all' (every sampler tier: plain, "
                        "top-k/top-p/min-p/logprobs, prompt logprobs, penalties) or 'plain' (temperature only; "
                        "the others compile on first use) (default all)")
    parser.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=d.compilation_cache,
                        help="keep compiled steps in $JAX_COMPILATION_CACHE_DIR (default $JPAGED_CACHE/xla) so "
                        "that a restart compiles nothing (default on)")
    parser.add_argument("--tool-call-parser", default=None, choices=("hermes", "llama3_json", "mistral"),
                        help="how tool calls are read out of the model's text for tool_choice 'auto': hermes "
                        "(Hermes, Qwen), llama3_json (Llama 3.x), mistral (default: none)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true", default=d.enable_auto_tool_choice,
                        help="accept tool_choice 'auto' (and tools without tool_choice); needs --tool-call-parser")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings of `add_server_args`'s flags (ValueError naming a bad one)."""
    return ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
        max_pending_requests=args.max_pending_requests, max_n=args.max_n, max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit, shutdown_timeout=args.shutdown_timeout,
        engine_stall_timeout=args.engine_stall_timeout, keep_alive_timeout=args.keep_alive_timeout,
        max_header_bytes=args.max_header_bytes, warmup=args.warmup,
        warmup_variants=args.warmup_variants, compilation_cache=args.compilation_cache,
        stream_interval=args.stream_interval, tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice)
