"""Internal HTTP routes on the ops server: vector store search and file chunks for the gateway.

The gateway cannot open a local-mode Qdrant (one process only), so it asks the process that holds it.
Not part of the public API; reachable only where the ops port is (loopback, the cluster network).
"""

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ingestion.service import IngestionService


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=status)


def internal_routes(service: IngestionService) -> list[Route]:
    """POST /internal/search, GET /internal/chunks and GET /internal/count."""

    async def search(request: Request) -> Response:
        try:
            body: dict[str, Any] = orjson.loads(await request.body())
            ids = [str(v) for v in body["vector_store_ids"]]
            query = body["query"]
            limit = int(body.get("max_num_results", 10))
            threshold = body.get("score_threshold")
            file_ids = body.get("file_ids")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _error(400, f"bad search request: {exc}")
        results = await service.search(ids, query, max_num_results=limit,
                                       score_threshold=float(threshold) if threshold is not None else None,
                                       file_ids=[str(f) for f in file_ids] if file_ids is not None else None)
        return Response(orjson.dumps({"results": [r.to_dict() for r in results]}), media_type="application/json")

    async def chunks(request: Request) -> Response:
        vector_store_id = request.query_params.get("vector_store_id", "")
        file_id = request.query_params.get("file_id", "")
        if not vector_store_id or not file_id:
            return _error(400, "vector_store_id and file_id are required")
        return Response(orjson.dumps({"chunks": service.chunks(vector_store_id, file_id)}),
                        media_type="application/json")

    async def count(request: Request) -> Response:
        return JSONResponse({"count": service.count(vector_store_id=request.query_params.get("vector_store_id"),
                                                    file_id=request.query_params.get("file_id"))})

    return [Route("/internal/search", search, methods=["POST"]), Route("/internal/chunks", chunks),
            Route("/internal/count", count)]
