"""The HTTP server of `mmt serve`: saved runs behind a JSON API (FastAPI) and a web page.

    POST /v1/vqa       image + question            -> {"model", "answer", "score"}
    POST /v1/caption   image (+ decoding options)  -> {"model", "caption", "score"[, "captions"]}
    POST /v1/search    text or image (+ k, index)  -> {"index", "model", "hits": [{"rank", "path", "score", "thumbnail"}]}
    POST /v1/explain   image + question / text     -> image/png heat maps; the result in the X-Mmt-Result header
    POST /v1/generate  text (+ num, sampling)      -> {"model", "text", "seed", "images": [data:image/png;base64,...]}
    GET  /v1/models    what is served; GET /healthz; GET /v1/thumbnail/{index}/{item}; GET / the page

A request body is JSON (the image as base64, or a data: URL) or multipart form data (the image
as a file part). Images are never named by a server path, and the server reads no file but the
runs' and indexes' own and, for thumbnails, the images an index lists (named by their number
in it). Every bad input gets a 4xx with {"error": "what was wrong"}.

Model work goes through one `Batcher` per model (batcher.py), which calls the Predictor's
batched methods (`answer`, `caption`, `embed_texts`, `embed_images`, `generate_images`) on a
worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmt.extras import require

fastapi = require("fastapi", "mmt serve")
require("python_multipart", "mmt serve (form uploads)")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from mmt.api import Predictor, load  # noqa: E402
from mmt.data.images import TOO_LARGE, ImageError, fit, open_image  # noqa: E402
from mmt.data.progress import progress_bars  # noqa: E402
from mmt.errors import CheckpointError, ConfigError  # noqa: E402
from mmt.serve.batcher import Batcher  # noqa: E402
from mmt.serve.bodies import (  # noqa: E402
    ApiError,
    CaptionRequest,
    ExplainRequest,
    GenerateRequest,
    Limits,
    SearchRequest,
    VqaRequest,
    openapi_body,
    read_fields,
    validated,
)

log = logging.getLogger(__name__)

PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # besides index.html, all the page is
THUMBNAIL_SIZE = 160


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

    def generate_batch(self, items: Sequence[tuple[str, tuple]]) -> list[list[str]]:
        """Each text's images as PNG data: URLs."""
        options = {k: v for k, v in items[0][1] if k != "request"}  # (a batch shares its key: num and the sampling options)
        with progress_bars(False):  # (no bar per request on the server's terminal)
            drawn = self.predictor.generate_images([text for text, _ in items], batch_size=len(items), **options)
        return [[_data_url(image) for image in images] for images in drawn]

    def describe(self) -> dict[str, Any]:
        head = getattr(self.predictor.model.config, "head", None)
        return {"name": self.name, "task": self.predictor.task, "image_size": self.predictor.image_size,
                **({"head": head} if self.predictor.task == "vqa" else {}),
                "batches": {"calls": self.batcher.calls, "requests": self.batcher.items, "max_batch": self.batcher.max_batch}}


def _data_url(image: Any) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


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
        fields, data = await read_fields(request, self.limits)
        body = validated(VqaRequest, fields)
        served = self.model(body.model, "vqa")
        image = await self.image(data, served.predictor)
        result = await _model_call(served.batcher.submit(served.answer_batch, (image, body.question)))
        return {"model": served.name, **result}

    async def caption(self, request: Request) -> dict[str, Any]:
        fields, data = await read_fields(request, self.limits)
        body = validated(CaptionRequest, fields)
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
        fields, data = await read_fields(request, self.limits)
        body = validated(SearchRequest, fields)
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

        fields, data = await read_fields(request, self.limits)
        body = validated(ExplainRequest, fields)
        if body.model is None:
            raise ApiError(422, f"model: name the model to explain ({', '.join(self.models)})")
        served = self.models.get(body.model)
        if served is None:
            raise ApiError(404, f"model {body.model!r} is not served; served: {', '.join(self.models)}")
        task = served.predictor.task
        if task not in ("vqa", "caption", "retrieval"):
            raise ApiError(422, f"model {body.model!r} is a {task} model; explain needs a vqa, caption or retrieval model")
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

    async def generate(self, request: Request) -> dict[str, Any]:
        """Text to image through the batcher. Sampling draws from one generator for a whole batch,
        so a seed reproduces a batch, not one row of it: a request with a seed (its own, or the
        run's, which a t2i run saves as 0) is drawn alone, and only unseeded requests with the same
        `num` and options share a batch. With the run's saved seed every request is seeded, and
        requests are drawn one at a time on the model's worker thread."""
        fields, data = await read_fields(request, self.limits)
        if data is not None:
            raise ApiError(422, "image: /v1/generate draws images from a text; it takes no image")
        body = validated(GenerateRequest, fields)
        served = self.model(body.model, "t2i")
        sampling = body.model_dump(exclude={"model", "text", "num"}, exclude_none=True)
        try:  # checked here, so that a bad option fails only its own request
            seed = served.predictor.decoding({**sampling, "num_return": body.num}).seed  # (unset: the run's seed)
        except (ValueError, TypeError) as e:
            raise ApiError(422, f"sampling options: {e}") from None
        key = tuple(sorted({**sampling, "num": body.num}.items()))
        if seed is not None:  # a seed reproduces a batch, not one row of it: a seeded request is drawn alone
            key += (("request", id(request)),)
        images = await _model_call(served.batcher.submit(served.generate_batch, (body.text, key), key=key))
        return {"model": served.name, "text": body.text, "seed": seed, "images": images}

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

    @app.post("/v1/vqa", tags=["models"], openapi_extra=openapi_body(VqaRequest))
    async def vqa(request: Request) -> dict[str, Any]:
        """Answer a question about an image: {"model", "answer", "score"}."""
        return await server.vqa(request)

    @app.post("/v1/caption", tags=["models"], openapi_extra=openapi_body(CaptionRequest))
    async def caption(request: Request) -> dict[str, Any]:
        """Caption an image: {"model", "caption", "score"}, and "captions" when num_return > 1."""
        return await server.caption(request)

    @app.post("/v1/search", tags=["models"], openapi_extra=openapi_body(SearchRequest))
    async def search(request: Request) -> dict[str, Any]:
        """The index's images that best match a text or an image: {"index", "model", "hits": [{"rank", "path", "score", "thumbnail"}]}."""
        return await server.search(request)

    @app.post("/v1/explain", tags=["models"], openapi_extra=openapi_body(ExplainRequest),
              responses={200: {"content": {"image/png": {}}, "description": "the heat maps; X-Mmt-Result holds the result as JSON"}})
    async def explain(request: Request) -> Response:
        """Where the model looked: a PNG of heat maps (the answer's, each caption word's, a match's)."""
        return await server.explain(request)

    @app.post("/v1/generate", tags=["models"], openapi_extra=openapi_body(GenerateRequest, image=False))
    async def generate(request: Request) -> dict[str, Any]:
        """Draw images of a text (a t2i run): {"model", "text", "seed", "images": [PNG data: URLs]}."""
        return await server.generate(request)

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
