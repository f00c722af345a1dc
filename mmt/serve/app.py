"""The HTTP server of `mmt serve`: saved runs behind a JSON API (FastAPI) and a web page.

    POST /v1/vqa       image + question            -> {"model", "answer", "score"}
    POST /v1/caption   image (+ decoding options)  -> {"model", "caption", "score"[, "captions"]}
    POST /v1/search    text or image (+ k, index)  -> {"index", "model", "hits": [{"rank", "path", "score", "thumbnail"}]}
    POST /v1/explain   image + question / text     -> image/png heat maps; the result in the X-Mmt-Result header
    GET  /v1/models    what is served; GET /healthz; GET /v1/thumbnail/{index}/{item}; GET / the page

A request body is JSON (the image as base64, or a data: URL) or multipart form data (the image
as a file part). Images are never named by a server path, and the server reads no file but the
runs' and indexes' own and, for thumbnails, the images an index lists (named by their number
in it). Every bad input gets a 4xx with {"error": "what was wrong"}.

Model work goes through one `Batcher` per model (batcher.py), which calls the Predictor's
batched methods (`answer`, `caption`, `embed_texts`, `embed_images`) on a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from mmt.extras import require

fastapi = require("fastapi", "mmt serve")
require("python_multipart", "mmt serve (form uploads)")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from mmt.api import Predictor, load  # noqa: E402
from mmt.data.images import TOO_LARGE, ImageError, fit, open_image  # noqa: E402
from mmt.errors import CheckpointError, ConfigError  # noqa: E402
from mmt.serve.batcher import Batcher  # noqa: E402

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 1000  # a question or a search text longer than this is refused
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # besides index.html, all the page is
THUMBNAIL_SIZE = 160


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


def _openapi_body(schema: type[BaseModel], image: bool = True) -> dict[str, Any]:
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


async def _fields(request: Request, limits: Limits) -> tuple[dict[str, Any], bytes | None]:
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


def _validated(schema: type[BaseModel], fields: dict[str, Any]) -> Any:
    """The fields checked against `schema` (form values are text: "3" is read as 3); 422 if not."""
    fields = {k: (int(v) if isinstance(v, str) and v.lstrip("-").isdigit() and k in ("layer", "head") else v) for k, v in fields.items()}
    fields = {k: v for k, v in fields.items() if not (isinstance(v, str) and v == "" and k != "question" and k != "text")}
    try:
        return schema.model_validate(fields)
    except ValidationError as e:
        problems = [f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        raise ApiError(422, "; ".join(problems)) from None


# ----------------------------------------------------------------------------- models


class ServedModel:
    """A Predictor with its batcher; the batched functions call the Predictor's own methods."""

    def __init__(self, name: str, predictor: Predictor, limits: Limits):
        self.name, self.predictor = name, predictor
        self.batcher = Batcher(limits.max_batch, limits.max_wait, name)

    def answer_batch(self, items: Sequence[tuple[Any, str]]) -> list[dict]:
        images, questions = zip(*items)
        return self.predictor.answer(list(images), list(questions), batch_size=len(items))

    def caption_batch(self, items: Sequence[tuple[Any, tuple]]) -> list[dict]:
        options = dict(items[0][1])  # (a batch shares its key: the decoding options)
        return self.predictor.caption([image for image, _ in items], batch_size=len(items), **options)

    def embed_text_batch(self, texts: Sequence[str]) -> list:
        return list(self.predictor.embed_texts(list(texts)).numpy())

    def embed_image_batch(self, images: Sequence[Any]) -> list:
        return list(self.predictor.embed_images(list(images), batch_size=len(images)).numpy())

    def describe(self) -> dict[str, Any]:
        head = getattr(self.predictor.model.config, "head", None)
        return {"name": self.name, "task": self.predictor.task, "image_size": self.predictor.image_size,
                **({"head": head} if self.predictor.task == "vqa" else {}),
                "batches": {"calls": self.batcher.calls, "requests": self.batcher.items, "max_batch": self.batcher.max_batch}}


def model_specs(specs: Sequence[str]) -> dict[str, str]:
    """{name: run directory} of `mmt serve`'s arguments: RUN_DIR (named by its folder) or NAME=RUN_DIR."""
    named: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        resolved = Path(path).resolve()
        name = name or (resolved.parent.name if resolved.name == "model" else resolved.name)
        if not name or name in named:
            raise ConfigError(f"{spec}: {'a model named ' + repr(name) + ' is served already' if name else 'no name'}; name it: NAME=RUN_DIR")
        named[name] = path
    return named


# ----------------------------------------------------------------------------- the app


class Server:
    """The served models and indexes, and the request handlers of the app (`create_app`)."""

    def __init__(self, models: Mapping[str, str | Path | Predictor], indexes: Sequence[str | Path], limits: Limits, device: str):
        if not models:
            raise ConfigError("mmt serve needs at least one run directory")
        self.limits = limits
        self.models = {name: ServedModel(name, m if isinstance(m, Predictor) else load(m, device=device), limits) for name, m in models.items()}
        self.indexes: dict[str, tuple[Any, ServedModel]] = {}
        for directory in indexes:
            self._add_index(Path(directory))

    def _add_index(self, directory: Path) -> None:
        from mmt.search import SearchIndex, model_fingerprint

        index = SearchIndex.load(directory)
        name = directory.resolve().name
        if name in self.indexes:
            raise ConfigError(f"--index {directory}: an index named {name!r} is served already")
        wanted = index.manifest["model_fingerprint"]
        served = next((m for m in self.models.values() if m.predictor.task == "retrieval"
                       and model_fingerprint(m.predictor.directory) == wanted), None)
        if served is None:
            raise ConfigError(f"--index {directory} was built with {index.manifest['model_dir']}, which is not served: "
                              f"serve that run too (mmt serve ... {index.manifest['model_dir']} --index {directory})")
        self.indexes[name] = (index, served)

    def model(self, name: str | None, task: str) -> ServedModel:
        if name is not None:
            if name not in self.models:
                raise ApiError(404, f"model {name!r} is not served; served: {', '.join(self.models)}")
            served = self.models[name]
            if served.predictor.task != task:
                raise ApiError(422, f"model {name!r} is a {served.predictor.task} model; this needs a {task} model")
            return served
        fitting = [m for m in self.models.values() if m.predictor.task == task]
        if len(fitting) != 1:
            raise ApiError(422 if fitting else 404, f"{len(fitting) or 'no'} {task} models are served; name one with \"model\""
                           + (f": {', '.join(m.name for m in fitting)}" if fitting else ""))
        return fitting[0]

    def index(self, name: str | None) -> tuple[Any, ServedModel, str]:
        if not self.indexes:
            raise ApiError(404, "no index is served: start the server with --index DIR (an `mmt index` folder)")
        if name is None:
            if len(self.indexes) > 1:
                raise ApiError(422, f"several indexes are served; name one with \"index\": {', '.join(self.indexes)}")
            name = next(iter(self.indexes))
        if name not in self.indexes:
            raise ApiError(404, f"index {name!r} is not served; served: {', '.join(self.indexes)}")
        return (*self.indexes[name], name)

    async def image(self, data: bytes | None, predictor: Predictor) -> Any:
        """The uploaded image as the model's (S, S, 3) uint8 square, decoded off the event loop."""
        if not data:
            raise ApiError(422, "image: missing or empty; give the image as a file part (form data) or as base64 (JSON)")

        def decode():
            return fit(open_image(data, name=f"the uploaded image ({len(data):,} bytes)", max_pixels=self.limits.max_pixels), predictor.fit)

        try:
            return await run_in_threadpool(decode)
        except ImageError as e:
            raise ApiError(413 if e.kind == TOO_LARGE else 400, str(e)) from None

    async def vqa(self, request: Request) -> dict[str, Any]:
        fields, data = await _fields(request, self.limits)
        body = _validated(VqaRequest, fields)
        served = self.model(body.model, "vqa")
        image = await self.image(data, served.predictor)
        result = await _model_call(served.batcher.submit(served.answer_batch, (image, body.question)))
        return {"model": served.name, **result}

    async def caption(self, request: Request) -> dict[str, Any]:
        fields, data = await _fields(request, self.limits)
        body = _validated(CaptionRequest, fields)
        served = self.model(body.model, "caption")
        options = body.model_dump(exclude={"model"}, exclude_none=True)
        try:
            served.predictor.decoding(options)  # checked here, so that a bad option fails only its own request
        except (ValueError, TypeError) as e:
            raise ApiError(422, f"decoding options: {e}") from None
        key = tuple(sorted(options.items()))
        if options.get("do_sample"):  # a sample depends on its batch's random draws: sampled alone
            key += (("request", id(request)),)
        image = await self.image(data, served.predictor)
        result = await _model_call(served.batcher.submit(served.caption_batch, (image, key), key=key))
        return {"model": served.name, **result}

    async def search(self, request: Request) -> dict[str, Any]:
        fields, data = await _fields(request, self.limits)
        body = _validated(SearchRequest, fields)
        index, served, name = self.index(body.index)
        if (body.text is None) == (not data):
            raise ApiError(422, "give exactly one query: text, or an image")
        if body.text is not None:
            vector = await _model_call(served.batcher.submit(served.embed_text_batch, body.text))
        else:
            image = await self.image(data, served.predictor)
            vector = await _model_call(served.batcher.submit(served.embed_image_batch, image))
        scores, paths = await run_in_threadpool(index.search, vector[None], body.k)
        positions = self._positions(name)
        hits = [{"rank": r + 1, "path": p, "score": round(float(s), 4), "thumbnail": f"/v1/thumbnail/{name}/{positions[p]}"}
                for r, (p, s) in enumerate(zip(paths[0], scores[0]))]
        return {"index": name, "model": served.name, "hits": hits}

    def _positions(self, name: str) -> dict[str, int]:
        index = self.indexes[name][0]
        if not hasattr(index, "_serve_positions"):
            index._serve_positions = {p: i for i, p in enumerate(index.paths)}
        return index._serve_positions

    async def thumbnail(self, name: str, item: int) -> Response:
        index, _, _ = self.index(name)
        if not 0 <= item < len(index.paths):
            raise ApiError(404, f"index {name!r} holds images 0 to {len(index.paths) - 1}; there is no image {item}")

        def draw() -> bytes:
            picture = open_image(index.paths[item], max_pixels=self.limits.max_pixels)  # only what the index lists
            picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            out = io.BytesIO()
            picture.save(out, "PNG")
            return out.getvalue()

        try:
            png = await run_in_threadpool(draw)
        except ImageError as e:
            raise ApiError(404, f"image {item} of index {name!r} cannot be read now: {e.detail}") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def explain(self, request: Request) -> Response:
        from mmt.explain import explain, render

        fields, data = await _fields(request, self.limits)
        body = _validated(ExplainRequest, fields)
        if body.model is None:
            raise ApiError(422, f"model: name the model to explain ({', '.join(self.models)})")
        served = self.models.get(body.model)
        if served is None:
            raise ApiError(404, f"model {body.model!r} is not served; served: {', '.join(self.models)}")
        task = served.predictor.task
        if task == "vqa" and body.question is None:
            raise ApiError(422, "question: explaining a VQA model needs the question")
        if task == "retrieval" and body.text is None:
            raise ApiError(422, "text: explaining a retrieval model needs a text to match the image with")
        image = await self.image(data, served.predictor)

        def draw() -> tuple[dict, bytes]:
            explained = explain(served.predictor, image, question=body.question, text=body.text, method=body.method,
                                layer=body.layer, head=body.head)
            out = io.BytesIO()
            render(explained).save(out, "PNG")
            return explained.result, out.getvalue()

        result, png = await _model_call(served.batcher.run(draw))
        return Response(png, media_type="image/png", headers={"X-Mmt-Result": json.dumps({"model": served.name, **result})})

    def describe(self) -> dict[str, Any]:
        return {"models": [m.describe() for m in self.models.values()],
                "indexes": [{"name": n, "model": m.name, "size": len(i)} for n, (i, m) in self.indexes.items()]}

    def close(self) -> None:
        for served in self.models.values():
            served.batcher.close()


async def _model_call(work) -> Any:
    """The awaited model work; a ValueError of the model's (a bad option, an unreadable input) is the request's fault."""
    try:
        return await work
    except (ValueError, TypeError) as e:
        raise ApiError(422, str(e)) from None


def _page(name: str) -> str:
    return resources.files("mmt.serve").joinpath("page", name).read_text(encoding="utf-8")


def create_app(
    models: Mapping[str, str | Path | Predictor], indexes: Sequence[str | Path] = (), limits: Limits | None = None,
    device: str = "auto",
) -> FastAPI:
    """The app serving `models` ({name: run directory or Predictor}) and `indexes` (`mmt index`
    folders, each built with one of the served retrieval models). `app.state.server` is the `Server`."""
    from mmt import __version__

    server = Server(models, indexes, limits or Limits(), device)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()  # the worker threads

    app = FastAPI(title="mmt serve", version=__version__, description=__doc__.split("\n\n")[1], lifespan=lifespan)
    app.state.server = server
    page = {name: _page(name) for name in ("index.html", *PAGE_FILES)}

    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, Any]:
        """Answers at once, also while the models are busy."""
        return {"status": "ok", "models": len(server.models), "indexes": len(server.indexes)}

    @app.get("/v1/models", tags=["server"])
    async def models_served() -> dict[str, Any]:
        """The served models (name, task, image size) and indexes (name, the model that searches it, size)."""
        return server.describe()

    @app.post("/v1/vqa", tags=["models"], openapi_extra=_openapi_body(VqaRequest))
    async def vqa(request: Request) -> dict[str, Any]:
        """Answer a question about an image: {"model", "answer", "score"}."""
        return await server.vqa(request)

    @app.post("/v1/caption", tags=["models"], openapi_extra=_openapi_body(CaptionRequest))
    async def caption(request: Request) -> dict[str, Any]:
        """Caption an image: {"model", "caption", "score"}, and "captions" when num_return > 1."""
        return await server.caption(request)

    @app.post("/v1/search", tags=["models"], openapi_extra=_openapi_body(SearchRequest))
    async def search(request: Request) -> dict[str, Any]:
        """The index's images that best match a text or an image: {"index", "model", "hits": [{"rank", "path", "score", "thumbnail"}]}."""
        return await server.search(request)

    @app.post("/v1/explain", tags=["models"], openapi_extra=_openapi_body(ExplainRequest),
              responses={200: {"content": {"image/png": {}}, "description": "the heat maps; X-Mmt-Result holds the result as JSON"}})
    async def explain(request: Request) -> Response:
        """Where the model looked: a PNG of heat maps (the answer's, each caption word's, a match's)."""
        return await server.explain(request)

    @app.get("/v1/thumbnail/{index}/{item}", tags=["models"], responses={200: {"content": {"image/png": {}}}})
    async def thumbnail(index: str, item: int) -> Response:
        """A small PNG of image `item` (its number in the index, as search hits give it)."""
        return await server.thumbnail(index, item)

    @app.get("/", include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page["index.html"])

    @app.get("/page/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            raise ApiError(404, f"no page file {name!r}")
        return Response(page[name], media_type=PAGE_FILES[name])

    return app


def serve(specs: Sequence[str], indexes: Sequence[str] = (), host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          device: str = "auto") -> None:
    """Run the server until interrupted (`mmt serve`)."""
    uvicorn = require("uvicorn", "mmt serve")
    try:
        app = create_app(model_specs(specs), indexes, limits, device)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    server = app.state.server
    for served in server.models.values():
        log.info("serving %s: %r", served.name, served.predictor)
    for name, (index, served) in server.indexes.items():
        log.info("serving index %s (%d images, searched with %s)", name, len(index), served.name)
    log.info("the page: http://%s:%d/  the API: http://%s:%d/openapi.json", host, port, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
