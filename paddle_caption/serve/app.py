"""The HTTP layer: thin FastAPI routes over `CaptionService`, the body-size limit, the API key,
request metrics, JSON errors, and the web page (static package data, no build step).

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status; validation
errors are 400 and name the field; nothing answers with a traceback.
"""
from __future__ import annotations

import contextlib
import hmac
import inspect
import json
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..fonts import cjk_font_ttf_bytes
from .telemetry import ServiceMetrics
from .openapi import CAPTIONS_DOC, CHAT_DOC, HEALTH_DOC, MODELS_DOC, describe_errors, install
from .protocol import ApiError, CaptionOptions, CaptionRequest, ChatCompletionRequest, validation_message
from .service import CaptionService, ClientGone
from .streaming import SSE_HEADERS

log = logging.getLogger("paddle_caption.serve")
STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": counted, never seen by anyone


# ------------------------------------------------------------------------------------ middleware
class BodySizeLimit:
    """413 for a body over `max_bytes`: at once if Content-Length says so, else while it streams."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body over the limit of {self.max_bytes} bytes (--max_body_mb)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(too_large)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts every HTTP request by route and status, and times it."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.on_request(endpoint, status[0], time.perf_counter() - start)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ------------------------------------------------------------------------------------ request bodies
def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, model):
    """The body as `model`: 415 unless JSON, 400 for malformed JSON or any invalid/unknown field."""
    ctype = _content_type(request)
    if ctype != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {ctype or 'none'}")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "empty request body; expected a JSON object")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err)
        raise ApiError(400, message, param=param) from None


async def read_caption_form(request: Request, max_files: int) -> tuple[list, CaptionOptions]:
    """multipart/form-data: one or more `image` files plus decoding options as fields."""
    async with request.form(max_files=max(max_files, 1) + 1, max_fields=64) as form:
        items, fields = [], {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "image":
                    raise ApiError(400, f"unexpected file field '{name}'; send images as 'image'", param=name)
                file_id = value.filename or str(len(items))
                items.append((file_id, await value.read(), f"image file {len(items)} ({file_id!r})"))
            elif name == "image":
                raise ApiError(400, "'image' must be a file upload in a multipart request "
                                    "(or send JSON with base64)", param="image")
            elif name in fields:
                raise ApiError(400, f"field '{name}' given twice", param=name)
            else:
                fields[name] = value
    if len(items) > max_files:
        raise ApiError(413, f"{len(items)} images in one request; the limit is {max_files} (--max_images_per_request)")
    try:
        return items, CaptionOptions.model_validate(fields)
    except ValidationError as err:
        message, param = validation_message(err)
        raise ApiError(400, message, param=param) from None


# ------------------------------------------------------------------------------------ the app
def create_app(service: CaptionService, metrics: ServiceMetrics, api_key: str | None = None,
               stop_timeout: float = 30.0) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine thread and, at shutdown, lets it finish what
    it holds (uvicorn has already drained the open requests by then)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            if not service.engine.stop(timeout=stop_timeout):
                log.warning("the engine did not finish within %s s", stop_timeout)

    app = FastAPI(title="paddle_caption caption service", lifespan=lifespan, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error_response(ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        return _error_response(ApiError(err.status_code, str(err.detail), type=kind, headers=err.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error ({type(err).__name__})", type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def answer(work, media_type: str):
        """Run `work` (a coroutine); a client that went away gets a 499 that nobody reads. A stream
        (an async generator: the job is queued already) is answered as `media_type`."""
        try:
            result = await work
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        if inspect.isasyncgen(result):
            return StreamingResponse(result, media_type=media_type, headers=SSE_HEADERS)
        return result

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models", **MODELS_DOC)
    async def models():
        return service.models()

    @v1.post("/chat/completions", **CHAT_DOC)
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        body = await read_json(request, ChatCompletionRequest)
        return await answer(service.chat(body, arrived, request.is_disconnected), "text/event-stream")

    @v1.post("/captions", **CAPTIONS_DOC)
    async def captions(request: Request):
        arrived = time.monotonic()
        ctype = _content_type(request)
        if ctype == "multipart/form-data":
            items, opts = await read_caption_form(request, service.limits.max_images_per_request)
        elif ctype == "application/json":
            body = await read_json(request, CaptionRequest)
            if body.image is not None:
                items = [(body.id or "0", body.image, "image")]
            else:
                items = [(str(k), item, f"images.{k}") if isinstance(item, str)
                         else (item.id or str(k), item.image, f"images.{k}.image") for k, item in enumerate(body.images)]
            opts = body.options()
        else:
            raise ApiError(415, "expected Content-Type application/json (base64 images) or multipart/form-data "
                                f"(image files), got {ctype or 'none'}")
        return await answer(service.captions(items, opts, arrived, request.is_disconnected), "application/x-ndjson")

    app.include_router(v1)

    @app.get("/health", **HEALTH_DOC)
    async def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", responses=describe_errors(), response_class=Response)
    async def metrics_text():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/examples", include_in_schema=False)
    async def examples():
        from starlette.concurrency import run_in_threadpool

        items = await run_in_threadpool(service.gallery)
        return [{"id": item["id"], "url": f"/examples/{k}.jpg", "reference": item["reference"]}
                for k, item in enumerate(items)]

    @app.get("/examples/{index}.jpg", include_in_schema=False)
    async def example_image(index: int):
        items = service.gallery()
        if not 0 <= index < len(items):
            raise ApiError(404, f"no example {index}", type="not_found_error")
        return Response(items[index]["jpeg"], media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/fonts/cjk.ttf", include_in_schema=False)
    async def cjk_font():
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(cjk_font_ttf_bytes)
        if data is None:
            raise ApiError(404, "no CJK font on this machine (pip install paperang-p2-fonts-cjk)",
                           type="not_found_error")
        return Response(data, media_type="font/ttf", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install(app)  # the document describes the bodies the routes read themselves
    return app


