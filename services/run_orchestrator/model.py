"""Streaming chat completions from the configured OpenAI-compatible endpoint, with retries."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai

from run_orchestrator.tools import ModelToolCall
from threadline_core.ids import new_id

_log = logging.getLogger(__name__)

TextSink = Callable[[str], Awaitable[None]]


class ModelError(Exception):
    """The model call failed for good; `code` is the run's `last_error.code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ModelTurn:
    """What one model call produced."""

    text: str = ""
    tool_calls: list[ModelToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ModelClient:
    """One `openai.AsyncOpenAI` client (connection pool) shared by every run of the instance."""

    def __init__(self, *, base_url: str, api_key: str, timeout: float, max_retries: int,
                 retry_backoff: float) -> None:
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "sk-no-key", max_retries=0,
                                          timeout=timeout)
        self._timeout = timeout
        self._max_retries = max_retries
        self._retry_backoff = retry_backoff

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.close()

    async def stream(self, request: dict[str, Any], on_text: TextSink) -> ModelTurn:
        """Call the model, streaming text to `on_text`; retry failures that happened before any output."""
        attempt = 0
        while True:
            turn = ModelTurn()
            try:
                await self._stream_once(request, turn, on_text)
                return turn
            except ModelError as error:
                retryable = error.code != "invalid_prompt" and not turn.text and not turn.tool_calls
                if not retryable or attempt >= self._max_retries:
                    raise
                attempt += 1
                _log.warning("model call failed (%s), retry %d/%d", error.message, attempt, self._max_retries)
                await asyncio.sleep(self._retry_backoff * 2 ** (attempt - 1))

    async def _stream_once(self, request: dict[str, Any], turn: ModelTurn, on_text: TextSink) -> None:
        calls: dict[int, _PartialCall] = {}
        try:
            stream = await self._client.chat.completions.create(**request)
            async for chunk in stream:
                if chunk.usage is not None:
                    turn.usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                                  "completion_tokens": chunk.usage.completion_tokens,
                                  "total_tokens": chunk.usage.total_tokens}
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        turn.text += delta.content
                        await on_text(delta.content)
                    for call in delta.tool_calls or []:
                        partial = calls.setdefault(call.index, _PartialCall())
                        if call.id:
                            partial.id = call.id
                        if call.function and call.function.name:
                            partial.name += call.function.name
                        if call.function and call.function.arguments:
                            partial.arguments.append(call.function.arguments)
                    if choice.finish_reason:
                        turn.finish_reason = choice.finish_reason
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            raise ModelError("server_error", f"The model did not answer within {self._timeout:g} seconds.") from exc
        except openai.RateLimitError as exc:
            raise ModelError("rate_limit_exceeded", f"The model is rate limited: {_detail(exc)}") from exc
        except openai.APIStatusError as exc:
            code = "invalid_prompt" if exc.status_code in (400, 413, 422) else "server_error"
            raise ModelError(code, f"The model returned HTTP {exc.status_code}: {_detail(exc)}") from exc
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            raise ModelError("server_error", f"Could not reach the model: {exc}") from exc
        turn.tool_calls = [ModelToolCall(id=p.id or new_id("call"), name=p.name, arguments="".join(p.arguments))
                           for _, p in sorted(calls.items())]


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return exc.message
