"""The models the model endpoint serves, for `GET /v1/models`: listed with the runs' client and kept briefly, since
SDKs and chat UIs list models on every start and the list rarely changes."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import openai

from run_orchestrator.model import error_detail

_log = logging.getLogger(__name__)

Lister = Callable[[float], Awaitable[list[dict[str, Any]]]]
"""Lists the endpoint's models within the given seconds (`ModelClient.list_models`)."""
DEFAULT_OWNER = "system"
"""`owned_by` of a model whose server names no owner (LM Studio sends none; the contract requires it)."""
MAX_DETAIL_CHARS = 300
"""The model server's own error message is cut to this in the error the client sees."""


class ModelsUnavailable(Exception):
    """Listing failed: the HTTP status (5xx) and message the client should be answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def as_model(item: Any) -> dict[str, Any] | None:
    """One listed model as exactly `openai.types.Model` (servers add fields, and some omit `created`/`owned_by`);
    None for an entry without an id."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        return None
    created = item.get("created")
    created = int(created) if isinstance(created, int | float) and not isinstance(created, bool) else 0
    owned_by = item.get("owned_by")
    return {"id": item["id"], "object": "model", "created": created,
            "owned_by": owned_by if isinstance(owned_by, str) and owned_by else DEFAULT_OWNER}


def as_models(items: list[Any]) -> list[dict[str, Any]]:
    """The server's list as `Model`s, in its order, each id once."""
    models: dict[str, dict[str, Any]] = {}
    for item in items:
        model = as_model(item)
        if model is not None:
            models.setdefault(model["id"], model)
    return list(models.values())


class ModelCatalog:
    """The endpoint's models, listed at most once per `ttl_seconds` and by one call at a time however many ask, and
    the names `aliases` (THREADLINE_MODEL_ALIASES) give them: a name a run can use is a model a client can retrieve.

    Failures are not kept: the next request asks the server again."""

    def __init__(self, lister: Lister, *, ttl_seconds: float, timeout_seconds: float,
                 aliases: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._lister = lister
        self._aliases = dict(aliases or {})
        self._ttl = ttl_seconds
        self._timeout = timeout_seconds
        self._clock = clock
        self._models: list[dict[str, Any]] | None = None
        self._listed_at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> list[dict[str, Any]] | None:
        if self._models is not None and self._clock() - self._listed_at < self._ttl:
            return self._models
        return None

    async def models(self, within: float | None = None) -> list[dict[str, Any]]:
        """Every model the endpoint serves; `within`: seconds the asker still waits (bounds the server's time).

        Raises ModelsUnavailable when the server cannot be reached or fails."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        async with self._lock:
            fresh = self._fresh()  # listed by another request while this one waited
            if fresh is not None:
                return fresh
            timeout = self._timeout if within is None else max(0.1, min(self._timeout, within))
            models = self._with_aliases(as_models(await self._list(seconds=timeout)))
            self._models, self._listed_at = models, self._clock()
            return models

    async def report(self, base_url: str, *, retry_seconds: float = 5.0) -> None:
        """Log whether the model endpoint answers and what it lists: a wrong THREADLINE_MODEL_BASE_URL or key shows
        when the service starts, not at the first run. Until it answers (a model server still loading its model),
        asked again after `retry_seconds`, doubling up to five minutes: the list also gives the models' context
        lengths (`ModelClient.context_tokens`)."""
        while True:
            try:
                models = await self.models()
                break
            except ModelsUnavailable as exc:
                _log.warning("model endpoint %s: %s (asked again in %g s)", base_url, exc.message, retry_seconds)
            await asyncio.sleep(retry_seconds)
            retry_seconds = min(retry_seconds * 2, 300.0)
        names = [m["id"] for m in models]
        _log.info("model endpoint %s lists %d models: %s%s", base_url, len(names), ", ".join(names[:20]),
                  ", ..." if len(names) > 20 else "")

    async def model(self, name: str, within: float | None = None) -> dict[str, Any] | None:
        """The model a run naming `name` uses, under that name (any name, with a `*` alias); None if there is none."""
        models = await self.models(within)
        found = next((m for m in models if m["id"] == name), None)
        if found is None and "*" in self._aliases:
            found = self._alias(name, self._aliases["*"], models)
        return found

    def _with_aliases(self, served: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The served models, then each alias the server does not serve under that name, as the model it names."""
        ids = {m["id"] for m in served}
        for name, upstream in self._aliases.items():
            if served and upstream not in ids:
                _log.warning("THREADLINE_MODEL_ALIASES maps %s to %s, which the model server does not list", name,
                             upstream)
        return served + [self._alias(name, upstream, served) for name, upstream in self._aliases.items()
                         if name != "*" and name not in ids]

    @staticmethod
    def _alias(name: str, upstream: str, served: list[dict[str, Any]]) -> dict[str, Any]:
        named = next((m for m in served if m["id"] == upstream), None)
        return {**(named or {"object": "model", "created": 0, "owned_by": DEFAULT_OWNER}), "id": name}

    async def _list(self, *, seconds: float) -> list[Any]:
        """The server's list within `seconds`; a server with no `/models` route lists nothing."""
        try:
            return await self._lister(seconds)
        except openai.NotFoundError:
            _log.info("the model server has no GET /models (404): no models listed")
            return []
        except openai.APITimeoutError as exc:
            raise ModelsUnavailable(504, "The model server did not list its models within "
                                         f"{round(seconds, 1):g} seconds (THREADLINE_MODEL_BASE_URL); retry "
                                         "shortly.") from exc
        except openai.APIConnectionError as exc:
            raise ModelsUnavailable(503, "The model server could not be reached to list its models "
                                         f"(THREADLINE_MODEL_BASE_URL): {_cut(str(exc.__cause__ or exc))}") from exc
        except openai.APIStatusError as exc:
            raise ModelsUnavailable(502, f"The model server answered HTTP {exc.status_code} to GET /models: "
                                         f"{_cut(error_detail(exc))}") from exc
        except Exception as exc:
            _log.exception("listing the model server's models failed")
            raise ModelsUnavailable(502, "The model server's list of models could not be read: "
                                         f"{type(exc).__name__}: {_cut(str(exc))}") from exc


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "..."
