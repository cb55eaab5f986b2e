"""Models (`GET /v1/models`, `GET /v1/models/{model}`): the run orchestrator talks to the model endpoint, so it lists
them; the gateway asks over Kafka request/reply (MODEL_REQUESTS out, SEARCH_REPLIES back through a ReplyClient)."""

from typing import Any

from gateway.errors import ApiError
from gateway.service_requests import ask
from gateway.settings import GatewaySettings
from threadline_core.events import ModelsRequested
from threadline_core.replies import ReplyClient

Doc = dict[str, Any]


def model_not_found(model: str) -> ApiError:
    """The hosted API's 404 for a model it does not serve."""
    return ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


async def ask_models(replies: ReplyClient, settings: GatewaySettings, project_id: str,
                     model: str | None = None) -> list[Doc]:
    """The models the endpoint serves (only `model`, when given); no answer or the orchestrator's error as the
    matching HTTP error (5xx)."""
    reply = await ask(replies, ModelsRequested(model=model), project_id=project_id,
                      wait_seconds=settings.models_timeout_seconds, late=(
                          f"The models were not listed within {settings.models_timeout_seconds:g} seconds (the run "
                          "orchestrator is busy or unavailable); retry shortly."), unavailable=(
                          "The models cannot be listed right now (the message broker did not take the request); "
                          "retry shortly."))
    return reply.items


async def list_models(replies: ReplyClient, settings: GatewaySettings, project_id: str) -> Doc:
    """GET /v1/models: every model of the endpoint, as `openai.types.Model`s in a list."""
    return {"object": "list", "data": await ask_models(replies, settings, project_id)}


async def retrieve_model(replies: ReplyClient, settings: GatewaySettings, project_id: str, model: str) -> Doc:
    """GET /v1/models/{model}: that model, or the hosted 404 `model_not_found`."""
    found = [item for item in await ask_models(replies, settings, project_id, model) if item.get("id") == model]
    if not found:
        raise model_not_found(model)
    return found[0]


async def delete_model(replies: ReplyClient, settings: GatewaySettings, project_id: str, model: str) -> Doc:
    """DELETE /v1/models/{model}: hosted deletes only the fine-tuned models of one's own organization, and the
    endpoint's models are none of those, so a model it serves is a 403 (an unknown one the 404 of retrieve)."""
    await retrieve_model(replies, settings, project_id, model)
    raise ApiError(403, f"The model '{model}' cannot be deleted: only fine-tuned models can be, and Threadline serves "
                   "the models of its model server, none of them fine-tuned here.", param="model",
                   code="model_not_deletable")
