"""The service's OpenAPI document describes the real request and response bodies.

The routes read their bodies themselves (app.py: JSON or multipart, with the service's own error
messages), so FastAPI cannot see them; this module declares them: each route's request body (the
chat request; the captions request as JSON *and* as multipart: `image` files plus the options as
form fields), its 200 answers (JSON, and the streamed media types) and every error status with
the error body. `install(app)` moves the request models' schemas into `components/schemas`. The
document is what the schema fuzzing test (tests/test_serve_fuzz.py) generates requests from and
checks answers against.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel

from .protocol import (CaptionOptions, CaptionRequest, CaptionResult, ChatCompletionRequest, ChatCompletionResponse,
                       ModelList)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    queued: int
    running: int
    decode_steps: int
    seconds_since_progress: float
    reason: Optional[str] = None


ERROR_STATUSES = {400: "bad input, named", 401: "missing or wrong API key", 404: "unknown model or route",
                  405: "method not allowed", 413: "body, image pixels or image count over the limit",
                  415: "wrong content type", 500: "the model failed", 503: "queue full or shutting down",
                  504: "request timeout"}
# text/event-stream: `schema` describes one event (OpenAPI < 3.2): its data is a chat.completion.chunk,
# an error body (JSON), or the final "[DONE]"
SSE = {"schema": {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a ChatCompletionChunk or an error as JSON, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}
JSON_LINES = {"schema": {"type": "string", "description": "one CaptionStreamEvent (JSON) per line"}}
# A 32x32 JPEG for the documented examples (which the fuzzing test also sends: valid requests answered 200)
EXAMPLE_IMAGE = ("/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1R"
                 "V19iZ2hnPk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
                 "Y2NjY2NjY2NjY2NjY2P/wAARCAAgACADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAA"
                 "AgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6"
                 "Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
                 "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREA"
                 "AgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
                 "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPE"
                 "xcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwCSiiivGPWCiiigAooooAKKKKAP/9k=")
_CHAT_MESSAGES = [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/jpeg;base64," + EXAMPLE_IMAGE}}]}]
CHAT_EXAMPLES = {
    "greedy": {"value": {"messages": _CHAT_MESSAGES, "max_tokens": 4}},
    "streamed": {"value": {"messages": _CHAT_MESSAGES, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}},
    "candidates": {"value": {"messages": _CHAT_MESSAGES, "max_tokens": 4, "temperature": 1.0, "n": 2, "logprobs": True,
                              "top_logprobs": 2}},
}
CAPTION_EXAMPLES = {"one image": {"value": {"image": EXAMPLE_IMAGE, "max_new_tokens": 4}},
                    "streamed": {"value": {"images": [EXAMPLE_IMAGE], "max_new_tokens": 4, "stream": True}}}
REQUEST_MODELS = {"ChatCompletionRequest": ChatCompletionRequest, "CaptionRequest": CaptionRequest,
                  "CaptionOptions": CaptionOptions}


def describe_errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses or ERROR_STATUSES}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(content: dict) -> dict:
    return {"openapi_extra": {"requestBody": {"required": True, "content": content}}}


CHAT_DOC = {
    **_body({"application/json": {"schema": _ref("ChatCompletionRequest"), "examples": CHAT_EXAMPLES}}),
    "responses": {200: {"model": ChatCompletionResponse, "description": "a chat.completion; with stream=true "
                        "server-sent events of chat.completion.chunk, then data: [DONE]",
                        "content": {"text/event-stream": SSE}}, **describe_errors()},
}
CAPTIONS_DOC = {
    **_body({"application/json": {"schema": _ref("CaptionRequest"), "examples": CAPTION_EXAMPLES},
             "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CaptionForm"},
                                     "encoding": {"image": {"contentType": "image/*"}}}}),
    "responses": {200: {"model": list[CaptionResult], "description": "one result per image; with stream=true "
                        "JSON lines (CaptionStreamEvent)", "content": {"application/x-ndjson": JSON_LINES}},
                  **describe_errors()},
}
MODELS_DOC = {"responses": {200: {"model": ModelList}, **describe_errors(401, 404, 405)}}
HEALTH_DOC = {"responses": {200: {"model": Health}, 503: {"model": Health, "description": "unavailable"},
                            **describe_errors(404, 405)}}


def _caption_form(options: dict) -> dict:
    """multipart/form-data of /v1/captions: one or more `image` files, the options as fields."""
    properties = {"image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}}
    properties.update(options["properties"])
    return {"type": "object", "title": "CaptionForm", "properties": properties, "required": ["image"],
            "additionalProperties": False}


def install(app) -> None:
    """Make `app.openapi()` carry the request models' schemas (in components/schemas)."""
    default = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = default()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, model in REQUEST_MODELS.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        schemas["CaptionForm"] = _caption_form(schemas["CaptionOptions"])
        app.openapi_schema = document
        return document

    app.openapi = openapi
