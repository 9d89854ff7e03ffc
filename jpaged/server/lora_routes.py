"""LoRA adapters over HTTP (vLLM's routes): the request's `model` names an adapter, `/v1/models` lists
them beside the base model, and `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` change them at
run time (read from disk and registered on the engine thread, between steps)."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from jpaged.lora import LoRARequest
from jpaged.server import protocol as p
from jpaged.server.async_engine import AsyncEngine, EngineDeadError


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class LoRAAdapters:
    """The server's view of the engine's adapters, by name (kept in step with the engine's registry:
    it changes only through these routes once the engine is built)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.by_name: dict[str, LoRARequest] = {}
        self.enabled = False

    def start(self) -> None:
        """Reads the adapters the engine was started with (`--lora-modules`)."""
        manager = getattr(self.engine.engine, "lora", None)
        self.enabled = manager is not None
        if manager is not None:
            self.by_name = {r.lora_name: r for r in manager.requests.values()}

    def resolve(self, model: str | None, base_name: str) -> LoRARequest | None:
        """The adapter `model` names, None for the base model; 404 for any other name."""
        if model is None or model == base_name:
            return None
        lora = self.by_name.get(model)
        if lora is None:
            served = f"'{base_name}'" + "".join(f", '{name}'" for name in self.by_name)
            raise p.ApiError(404, f"The model '{model}' does not exist; this server serves {served}",
                             param="model", code="model_not_found")
        return lora

    def cards(self, base_name: str) -> list[dict]:
        return [{"id": r.lora_name, "object": "model", "created": int(time.time()), "owned_by": "jpaged",
                 "root": r.lora_path, "parent": base_name} for r in self.by_name.values()]

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise p.ApiError(400, "LoRA adapters are not enabled on this server (start it with --enable-lora)",
                             code="lora_disabled")

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        self._check_enabled()
        if body.lora_name in self.by_name:
            raise p.ApiError(400, f"The LoRA adapter '{body.lora_name}' is already loaded", param="lora_name",
                             code="lora_exists")
        lora = LoRARequest(body.lora_name, max((r.lora_int_id for r in self.by_name.values()), default=0) + 1,
                           body.lora_path)
        await self._on_engine(lambda engine: engine.add_lora(lora), "lora_path")
        self.by_name[lora.lora_name] = lora
        return f"Success: LoRA adapter '{lora.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        self._check_enabled()
        lora = self.by_name.get(body.lora_name)
        if lora is None or (body.lora_int_id is not None and body.lora_int_id != lora.lora_int_id):
            raise p.ApiError(404, f"The LoRA adapter '{body.lora_name}' cannot be found", param="lora_name",
                             code="lora_not_found")
        await self._on_engine(lambda engine: engine.remove_lora(lora.lora_int_id), "lora_name")
        del self.by_name[lora.lora_name]
        return f"Success: LoRA adapter '{lora.lora_name}' removed successfully."

    async def _on_engine(self, fn, param: str) -> None:
        try:
            await self.engine.call(fn)
        except ValueError as e:
            raise p.ApiError(400, str(e), param=param, code="invalid_lora_adapter") from None
        except EngineDeadError as e:
            raise p.ApiError(503, str(e), type="service_unavailable", code="engine_dead") from None


def add_routes(app: FastAPI, adapters: LoRAAdapters, route, parse) -> None:
    """The two run-time routes, behind `route` (auth, body cap, request metrics) as every API route."""
    def text(message: str) -> Response:
        return Response(message, media_type="text/plain")

    async def load(request: Request, body: bytes) -> Response:
        return text(await adapters.load(parse(LoadLoRAAdapterRequest, body)))

    async def unload(request: Request, body: bytes) -> Response:
        return text(await adapters.unload(parse(UnloadLoRAAdapterRequest, body)))

    app.add_api_route("/v1/load_lora_adapter", route("load_lora_adapter", load, body=True), methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", route("unload_lora_adapter", unload, body=True), methods=["POST"])
