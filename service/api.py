"""HTTP routes: history, REST send, semantic search, health, metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from bson import ObjectId
from bson.errors import InvalidId
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, Field

from service.auth import Principal, verify_token
from service.errors import ChatError, Forbidden, InvalidPayload, StoreUnavailable
from service.store import message_view

if TYPE_CHECKING:
    from service.app import Gateway

__all__ = ["router"]

router = APIRouter()
MAX_PAGE = 200


class ErrorBody(BaseModel):
    code: str = Field(examples=["invalid_payload"])
    message: str


class ErrorResponse(BaseModel):
    ok: bool = False
    error: ErrorBody


class SendRequest(BaseModel):
    client_msg_id: str = Field(min_length=1, max_length=256, examples=["2f1c0e4e-7a8b"])
    text: str = Field(min_length=1, examples=["Customer cannot sign in since 09:00"])
    traceparent: str | None = None


class Ack(BaseModel):
    ok: bool = True
    id: str
    created_at: str
    duplicate: bool = False


class Message(BaseModel):
    id: str
    task_id: str
    sender: str
    role: str
    client_msg_id: str
    text: str
    created_at: str


class HistoryPage(BaseModel):
    messages: list[Message]
    next_before: str | None = Field(
        description="Pass as `before` to fetch the next (older) page; null on the last page."
    )


class SearchResult(BaseModel):
    score: float
    message: Message


class SearchResponse(BaseModel):
    results: list[SearchResult]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 413, 429, 503)
}


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def error_response(error: ChatError) -> JSONResponse:
    return JSONResponse(error.to_ack(), status_code=error.http_status)


def principal_of(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """Verify the bearer token of a request."""
    token = None
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    gateway = gateway_of(request)
    return verify_token(
        gateway.secret, token, leeway=gateway.settings.token_leeway_seconds
    )


Auth = Annotated[Principal, Depends(principal_of)]


def _own_task(principal: Principal, task: str) -> None:
    if task != principal.task:
        raise Forbidden(
            f"this token grants access to task {principal.task!r}, not {task!r}: "
            "use a token minted for that task"
        )


@router.get(
    "/api/tasks/{task}/messages",
    response_model=HistoryPage,
    responses=ERRORS,
    summary="Read a task's history, newest first",
)
async def history(
    request: Request,
    task: str,
    principal: Auth,
    before: Annotated[
        str | None, Query(description="A message id: return older messages.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Any:
    _own_task(principal, task)
    cursor = None
    if before is not None:
        try:
            cursor = ObjectId(before)
        except (InvalidId, TypeError):
            raise InvalidPayload(
                f"before must be a message id (24 hex characters), not {before[:40]!r}"
            ) from None
    gateway = gateway_of(request)
    try:
        docs = await gateway.store.history(task, before=cursor, limit=limit)
    except Exception as exc:
        raise StoreUnavailable(f"reading history failed: {type(exc).__name__}") from exc
    messages = [message_view(doc) for doc in docs]
    next_before = messages[-1]["id"] if len(messages) == limit else None
    return {"messages": messages, "next_before": next_before}


@router.post(
    "/api/tasks/{task}/messages",
    response_model=Ack,
    status_code=201,
    responses={
        200: {"model": Ack, "description": "A retry of a stored message"},
        **ERRORS,
    },
    summary="Send a message through the same pipeline as the socket event",
)
async def send(request: Request, task: str, principal: Auth, body: SendRequest) -> Any:
    _own_task(principal, task)
    gateway = gateway_of(request)
    payload = body.model_dump(exclude_none=True)
    tracestate = None
    if payload.get("traceparent") is None and request.headers.get("traceparent"):
        payload["traceparent"] = request.headers["traceparent"]
        # The W3C header may come as several lines: together they are one list.
        tracestate = ",".join(request.headers.getlist("tracestate")) or None
    ack = await gateway.service.handle(
        principal, payload, socket_bucket=None, tracestate=tracestate
    )
    if not ack["ok"]:
        status = gateway.error_status(ack["error"]["code"])
        return JSONResponse(ack, status_code=status)
    return JSONResponse(ack, status_code=200 if ack.get("duplicate") else 201)


@router.get(
    "/api/search",
    response_model=SearchResponse,
    responses=ERRORS,
    summary="Search a task's messages by meaning",
)
async def search(
    request: Request,
    principal: Auth,
    q: Annotated[str, Query(min_length=1, max_length=1000)],
    task: Annotated[
        str | None, Query(description="Defaults to the token's task.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> Any:
    task = task or principal.task
    _own_task(principal, task)
    if not q.strip():
        raise InvalidPayload("q must contain at least one non-blank character")
    gateway = gateway_of(request)
    results = await gateway.search(task, q, limit)
    return {"results": results}


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    checks = await gateway_of(request).readiness()
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


def metrics_response(gateway: Gateway, accept: str | None) -> Response:
    """Render the metrics, in OpenMetrics (with exemplars) when the scraper accepts it."""
    encoder, content_type = choose_encoder(accept or "")
    started = time.perf_counter()
    body = encoder(gateway.metrics.exposition_registry())
    gateway.last_scrape_seconds = time.perf_counter() - started
    return Response(body, media_type=content_type)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    gateway = gateway_of(request)
    if gateway.settings.metrics_port is not None:
        return Response("metrics are served on CHAT_METRICS_PORT\n", status_code=404)
    return metrics_response(gateway, request.headers.get("accept"))
