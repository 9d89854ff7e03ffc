"""`jpaged serve`: the OpenAI-compatible HTTP server (protocol, routes, engine thread, metrics); docs/server.md."""
from jpaged.server.api_server import BackgroundServer, build_app, engine_config, serve
from jpaged.server.settings import ServerSettings

__all__ = ["BackgroundServer", "ServerSettings", "build_app", "engine_config", "serve"]
