"""Request and response schemas of the caption service (pydantic), and its error type.

The chat schema is OpenAI's `/v1/chat/completions` with vision content parts: a user message's
content is a string or a list of `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}` parts. Beyond OpenAI's
fields, the kit's decoding options use PaddleNLP's names (`num_beams`, `top_k`,
`repetition_penalty`, `length_penalty`). Every request model refuses unknown fields: a misspelt
option is an error, not a silent default.

The decoding fields of both endpoints are derived from `decoding.config.GenerationConfig`
(`decoding.derive.options_model`: its types, defaults, bounds and help), and each request builds
its `GenerationConfig` while it is parsed (`generation`), so a bad combination of options is a 400
from the parse. Only the OpenAI names are this module's own, and only on the chat endpoint:
`max_tokens`/`max_completion_tokens` (max_new_tokens), `temperature` (0 or omitted: greedy, i.e.
do_sample), `n` (num_return_sequences: n samples, or the n best beams), `logprobs`/`top_logprobs`
(OpenAI's shapes: `ChoiceLogprobs`) and an omitted `seed` (a random one).

Streaming (`stream: true`) answers server-sent events of `ChatCompletionChunk`s (OpenAI's
`chat.completion.chunk`), `/v1/captions` JSON lines of `CaptionStreamEvent`s (see streaming.py).
"""
from __future__ import annotations

import secrets
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..decoding.config import GenerationConfig
from ..decoding.derive import options_model


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """One line naming each bad field, e.g. "messages.0.content.1.image_url: Field required";
    also returns the first field's path (the error's `param`).

    pydantic's paths carry union-branch labels (`str`, `list[tagged-union[...]]`, the tag value);
    they are dropped, and a field that is a string *or* a list reports only the branch the input
    took (both branches when it is neither).
    """
    items = [dict(item) for item in err.errors()]
    branches: dict[tuple, dict] = {}  # union field -> errors of its string branch and its other branch
    for item in items:
        raw = [str(x) for x in item["loc"]]
        for j, part in enumerate(raw):
            if _is_branch_label(part):
                item["branch_depth"] = j + 1
                branches.setdefault(tuple(raw[:j]), {"str": [], "other": []})[
                    "str" if part == "str" else "other"].append(item)
                break
    drop = set()
    for prefix, branch in branches.items():
        if branch["str"] and branch["other"]:
            drop.update(id(x) for x in branch["str"])  # the input was not a string
            if all(len(x["loc"]) == x["branch_depth"] for x in branch["other"]):  # nor the other kind
                kind = "a list" if str(branch["other"][0]["loc"][-1]).startswith("list[") else "an object"
                for x in branch["other"]:
                    x["msg"], x["loc"] = f"expected a string or {kind}", prefix
    parts, first = [], None
    for item in items:
        if id(item) in drop:
            continue
        loc = ".".join(_clean_loc(item["loc"]))
        first = first or loc or None
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif item["type"] == "model_type" and not loc:
            parts.append("expected a JSON object")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), first


def _is_branch_label(part: str) -> bool:
    """`str`, `list[...]`, a model's class name: pydantic's names for union branches (our fields are snake_case)."""
    return part == "str" or "[" in part or part[:1].isupper() or part.startswith("function-")


def _clean_loc(loc) -> list[str]:
    """Drop pydantic's union labels from an error path (see validation_message)."""
    parts, out, i = [str(x) for x in loc], [], 0
    while i < len(parts):
        part = parts[i]
        if "tagged-union[" in part:  # then the list index (kept) and the tag value (dropped)
            out.extend(parts[i + 1:i + 2])
            i += 3
            continue
        if not _is_branch_label(part):
            out.append(part)
        i += 1
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ chat
class ImageURL(Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted for compatibility; unused


class ImageURLPart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(Strict):
    type: Literal["text"]
    text: str


ContentPart = Annotated[Union[TextPart, ImageURLPart], Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None


# The chat endpoint's own names for these options (OpenAI's), mapped in `ChatCompletionRequest.generation`.
CHAT_ALIASED = ("max_new_tokens", "do_sample", "temperature")


def chat_options_model(decoding=GenerationConfig):
    """The decoding fields of /v1/chat/completions: `decoding`'s options but the OpenAI-named ones;
    top_p, top_k and seed accept null (OpenAI clients send it for "unset")."""
    return options_model("ChatDecodingOptions", decoding, base=Strict, exclude=CHAT_ALIASED,
                         optional=("top_p", "top_k", "seed"))


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with `usage` (and no choices); every other chunk: usage null


class ChatCompletionRequest(chat_options_model()):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    # Omitted or 0: greedy, as predict_batch.py (a caption service wants the model's best caption).
    temperature: Optional[float] = Field(None, ge=0, le=2)
    n: int = Field(1, ge=1, description="candidates: n samples (temperature > 0) or the n best beams")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: bool = Field(False, description="each chosen token's log-probability (the model's, before "
                                              "penalties and sampling settings)")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="also this many most likely tokens")
    user: Optional[str] = None
    _generation: GenerationConfig = PrivateAttr()

    @model_validator(mode="after")
    def _options(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options goes with stream=true")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.n > 1 and not self.do_sample and self.num_beams < self.n:
            raise ValueError(f"n={self.n} needs sampling (temperature > 0) or num_beams >= n: greedy "
                             "decoding would repeat one caption")
        values = self.decoding_values()
        values.setdefault("seed", secrets.randbits(31))  # OpenAI: no seed, no reproducibility promise
        sample = self.do_sample
        self._generation = self.decoding_class(
            **values, do_sample=sample, temperature=self.temperature if sample and self.temperature else 1.0,
            num_return_sequences=self.n, logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0)  # max_new_tokens: the service's default or requested_max_tokens
        return self

    @property
    def generation(self) -> GenerationConfig:
        """The decoding options of this request (checked at parse); the service sets max_new_tokens."""
        return self._generation

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def do_sample(self) -> bool:
        """Sampling iff temperature > 0, or temperature omitted and top_p < 1 or top_k > 0."""
        if self.temperature is not None:
            return self.temperature > 0
        return (self.top_p is not None and self.top_p < 1) or bool(self.top_k)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None  # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprobOut]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChoiceLogprobs] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: {...}`; the last is `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


# ------------------------------------------------------------------------------------ captions
def caption_options_model(decoding=GenerationConfig):
    """The decoding fields of /v1/captions: every option of `decoding` by its own name (as
    predict_batch.py's flags); max_new_tokens may be omitted (the service's default)."""
    return options_model("CaptionDecodingOptions", decoding, base=Strict, optional=("max_new_tokens",))


class CaptionOptions(caption_options_model()):
    """Decoding options of `/v1/captions` (predict_batch.py's flags; image k of a request samples
    with seed + k); the default is greedy."""

    prompt: Optional[str] = None  # replaces the model's training instruction
    system: Optional[str] = None  # replaces the model's system message
    stream: bool = Field(False, description="answer JSON lines (CaptionStreamEvent) as captions grow")
    _generation: GenerationConfig = PrivateAttr()

    @model_validator(mode="after")
    def _options(self):
        self._generation = self.decoding_class(**self.decoding_values())
        return self

    @property
    def generation(self) -> GenerationConfig:
        """The decoding options of this request (checked at parse); max_new_tokens is the dataclass
        default when omitted: the service replaces it with its own (`max_new_tokens` stays None)."""
        return self._generation


class CaptionImage(Strict):
    id: Optional[str] = None
    image: str  # base64 or a data: URL


class CaptionRequest(CaptionOptions):
    """JSON form: `{"image": B64}` (with an optional `id`) or `{"images": [B64 | {"id", "image"}, ...]}`."""

    image: Optional[str] = None
    id: Optional[str] = None
    images: Optional[list[Union[str, CaptionImage]]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("send exactly one of 'image' (one base64 image) or 'images' (a list)")
        if self.id is not None and self.image is None:
            raise ValueError("'id' goes with 'image'; in 'images' give each item its own id")
        return self

    def options(self) -> CaptionOptions:
        return CaptionOptions(**{name: getattr(self, name) for name in CaptionOptions.model_fields})


class CaptionResult(BaseModel):
    id: str
    caption: str
    tokens: int
    latency_ms: float
    # mean log-probability of the caption's tokens under the model (null: empty caption); keep
    # captions above a threshold to drop low-confidence ones
    mean_logprob: Optional[float] = None
    finish_reason: Literal["stop", "length"] = "stop"


class CaptionStreamEvent(BaseModel):
    """One line of a streamed `/v1/captions` answer: a `delta` of image `index`'s caption, or its
    `result` when it is done, or an `error` that ends the stream."""

    index: Optional[int] = None
    id: Optional[str] = None
    delta: Optional[str] = None
    result: Optional[CaptionResult] = None
    error: Optional[dict] = None


# ------------------------------------------------------------------------------------ models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "paddle_caption"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
