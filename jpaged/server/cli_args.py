"""The `jpaged serve` flags of the server itself (the engine's come from EngineConfig's fields)."""
from __future__ import annotations

import argparse

from jpaged.server.body_limit import DEFAULT_MAX_REQUEST_BYTES


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--max-pending-requests", type=int, default=1024, help="queue limit; beyond it, 429")
    parser.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body; beyond it, 413 (default %(default)s)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to finish requests on SIGTERM")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")


def server_settings(args: argparse.Namespace) -> dict:
    """`jpaged.server.serve`'s keyword arguments from the flags add_server_args defined."""
    return dict(host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
                max_pending_requests=args.max_pending_requests, max_n=args.max_n,
                max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
                log_level=args.log_level)
