"""Models: list, retrieve (ids may hold `/` and `:`, as `meta-llama/Llama-3.1-8B-Instruct` or `llama3.1:8b`), delete."""

from fastapi import APIRouter
from fastapi.responses import Response

from gateway import models_service as service
from gateway.deps import CallerDep, ModelsDep, SettingsDep
from gateway.http import json_response

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
async def list_models(caller: CallerDep, replies: ModelsDep, settings: SettingsDep) -> Response:
    """List the models the model endpoint serves, so SDK connectivity checks and model pickers work."""
    return json_response(await service.list_models(replies, settings, caller.project_id))


@router.get("/models/{model:path}")
async def retrieve_model(model: str, caller: CallerDep, replies: ModelsDep, settings: SettingsDep) -> Response:
    """Retrieve one model of the model endpoint (404 `model_not_found` when it does not serve it)."""
    return json_response(await service.retrieve_model(replies, settings, caller.project_id, model))


@router.delete("/models/{model:path}")
async def delete_model(model: str, caller: CallerDep, replies: ModelsDep, settings: SettingsDep) -> Response:
    """Refuse to delete a model in the OpenAI format (there is no fine-tuned model here to delete)."""
    return json_response(await service.delete_model(replies, settings, caller.project_id, model))
