"""`jpaged serve`: the OpenAI-compatible HTTP server (protocol, routes, engine thread, metrics)."""
from jpaged.server.api_server import BackgroundServer, build_app, engine_config, serve

__all__ = ["BackgroundServer", "build_app", "engine_config", "serve"]
