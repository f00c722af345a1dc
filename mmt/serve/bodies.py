"""What a request of `mmt serve` may hold, and reading it: JSON or multipart form data, the image
as base64 or as a file part, every field checked (pydantic) with a 4xx saying what was wrong."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Annotated, Any, Literal

from mmt.extras import require

require("fastapi", "mmt serve")

from fastapi import Request  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

MAX_TEXT_CHARS = 1000  # a question or a search text longer than this is refused
MAX_IMAGES = 8  # images one text-to-image request may ask for


@dataclasses.dataclass
class Limits:
    """What one request may ask of the server."""

    max_image_bytes: int = 10 * 1024 * 1024  # an uploaded image file (before base64)
    max_pixels: int = 16_000_000  # width x height, checked from the header before decoding
    max_batch: int = 32  # requests served in one model call (1: no dynamic batching)
    max_wait: float = 0.010  # seconds the first request of a batch waits for others

    @property
    def max_body_bytes(self) -> int:  # the image as base64 (4/3 larger) plus the other fields
        return self.max_image_bytes * 4 // 3 + (1 << 20)


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and a message saying what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ----------------------------------------------------------------------------- request bodies

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS)]
IMAGE_FIELD = {"type": "string", "description": "the image: base64 (or a data: URL) in JSON, a file part in multipart form data"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VqaRequest(_Body):
    model: str | None = Field(None, description="a served VQA model's name (optional when only one is served)")
    question: Text


class CaptionRequest(_Body):
    """Decoding options left out keep the run's own settings (docs/usage/decoding.md)."""

    model: str | None = None
    num_beams: int | None = Field(None, ge=1, le=16)
    length_penalty: float | None = Field(None, ge=-5, le=5)
    max_new_tokens: int | None = Field(None, ge=1, le=256)
    num_return: int | None = Field(None, ge=1, le=16)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None


class SearchRequest(_Body):
    index: str | None = Field(None, description="a served index's name (optional when only one is served)")
    text: Text | None = Field(None, description="search by text, or give an image instead")
    k: int = Field(8, ge=1, le=100)


class ExplainRequest(_Body):
    model: str | None = None
    question: Text | None = Field(None, description="for a VQA model")
    text: Text | None = Field(None, description="for a retrieval model: the text to match the image with")
    method: Literal["attention", "gradient", "gradcam"] = "attention"
    layer: Literal["first", "last", "mean"] | int = "first"
    head: Literal["mean"] | int = "mean"


class GenerateRequest(_Body):
    """Sampling options left out keep the run's own settings (docs/usage/decoding.md)."""

    model: str | None = Field(None, description="a served t2i model's name (optional when only one is served)")
    text: Text = Field(description="what to draw")
    num: int = Field(4, ge=1, le=MAX_IMAGES, description="images to draw")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed, text and options draw the same images")
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="classifier-free guidance; 1: off")
    temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)


def openapi_body(schema: type[BaseModel], image: bool = True) -> dict[str, Any]:
    """The request body's description for OpenAPI: the same fields as JSON or as form data."""
    fields = schema.model_json_schema()
    if image:
        fields = {**fields, "properties": {"image": IMAGE_FIELD, **fields["properties"]}}
        fields["required"] = ["image", *fields.get("required", [])] if schema is not SearchRequest else fields.get("required", [])
    form = {**fields, "properties": {**fields["properties"], "image": {"type": "string", "format": "binary"}}} if image else fields
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": fields}, "multipart/form-data": {"schema": form}}}}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the rest."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length):,} bytes exceeds the {limit:,}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the {limit:,}-byte limit")
    return bytes(body)


def _base64_image(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ApiError(422, "image: give the image file as a base64 string (or a data: URL)")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64") from None


async def read_fields(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
    """(the request's fields but the image, the image file's bytes or None), from JSON or form data."""
    body = await _read_body(request, limits.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        if not isinstance(fields, dict):
            raise ApiError(400, f"the JSON body must be an object of fields, not a {type(fields).__name__}")
        image = fields.pop("image", None)
        image = None if image is None else _base64_image(image)
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
        except HTTPException as e:  # the form parser's own complaint
            raise ApiError(400, f"malformed form data: {e.detail}") from None
        except Exception as e:
            raise ApiError(400, f"malformed form data ({type(e).__name__}: {e})") from None
        fields, image = {}, None
        for key, value in form.multi_items():
            if key in fields or (key == "image" and image is not None):
                raise ApiError(422, f"{key}: given twice")
            if key == "image":
                image = await value.read() if hasattr(value, "read") else _base64_image(value)
            elif hasattr(value, "read"):
                raise ApiError(422, f"{key}: a file where text was expected")
            else:
                fields[key] = value
        await form.close()
    else:
        raise ApiError(415, f"content type {kind or '(none)'!r}: send application/json or multipart/form-data")
    if image is not None and len(image) > limits.max_image_bytes:
        raise ApiError(413, f"image: {len(image):,} bytes exceeds the {limits.max_image_bytes:,}-byte limit")
    return fields, image


def validated(schema: type[BaseModel], fields: dict[str, Any]) -> Any:
    """The fields checked against `schema` (form values are text: "3" is read as 3); 422 if not."""
    fields = {k: (int(v) if isinstance(v, str) and v.lstrip("-").isdigit() and k in ("layer", "head") else v) for k, v in fields.items()}
    fields = {k: v for k, v in fields.items() if not (isinstance(v, str) and v == "" and k != "question" and k != "text")}
    try:
        return schema.model_validate(fields)
    except ValidationError as e:
        problems = [f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        raise ApiError(422, "; ".join(problems)) from None
