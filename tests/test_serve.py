"""`mmt serve` (mmt.serve): every endpoint against the Predictor it serves, every bad input a 4xx
with a JSON reason, dynamic batching (one model call, the same answers), /healthz under load."""

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="mmt serve needs the serve extra (fastapi, uvicorn, python-multipart)")
httpx = pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

import mmt  # noqa: E402
from mmt.errors import ConfigError  # noqa: E402
from mmt.serve.app import Limits, create_app, model_specs  # noqa: E402
from mmt.serve.batcher import Batcher  # noqa: E402
from tests.test_api import saved  # noqa: E402

QUESTION = "a red circle"  # words the tiny models' tokenizer knows
LIMITS = Limits(max_image_bytes=20_000, max_pixels=100 * 100, max_wait=0.005)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def scene(seed: int, side: int = 32) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"vqa", "caption", "retrieval", "index", "gallery"}: tiny random models saved as runs, and
    an index of four gallery images built with the retrieval model."""
    from mmt.data.answers import AnswerVocab

    root = tmp_path_factory.mktemp("serve")
    vqa, _ = saved(root, "vqa-small", num_answers=3)
    AnswerVocab(["yes", "no", "2"]).save(vqa / "answers.json")
    caption, _ = saved(root, "caption-tiny", vocab_size=14)
    retrieval, _ = saved(root, "retrieval-tiny")
    gallery = root / "gallery"
    gallery.mkdir()
    for i in range(4):
        (gallery / f"{i}.png").write_bytes(scene(100 + i))
    out = {"vqa": vqa, "caption": caption, "retrieval": retrieval, "gallery": gallery}
    try:
        from mmt.search import build_index
    except ImportError:  # (no faiss: the search tests skip)
        return out
    build_index(retrieval, gallery, root / "index", progress=False)
    return {**out, "index": root / "index"}


def make_app(runs, limits=LIMITS, **only):
    models = only or {"vqa": runs["vqa"], "caption": runs["caption"], "retrieval": runs["retrieval"]}
    return create_app(models, [runs["index"]] if "index" in runs and not only else [], limits, device="cpu")


@pytest.fixture(scope="module")
def app(runs):
    return make_app(runs)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def predictor(app, name):
    return app.state.server.models[name].predictor


def test_health_models_and_the_openapi_description(client):
    assert client.get("/healthz").json()["status"] == "ok"
    served = client.get("/v1/models").json()
    assert [(m["name"], m["task"]) for m in served["models"]] == [("vqa", "vqa"), ("caption", "caption"), ("retrieval", "retrieval")]
    if served["indexes"]:
        assert served["indexes"] == [{"name": "index", "model": "retrieval", "size": 4}]
    spec = client.get("/openapi.json").json()
    for path in ("/v1/vqa", "/v1/caption", "/v1/search", "/v1/explain"):
        assert set(spec["paths"][path]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "question" in spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"/v1/models", "/healthz", "/v1/thumbnail/{index}/{item}"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<title>mmt serve</title>" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere
    for name in ("app.js", "style.css"):
        file = client.get(f"/page/{name}")
        assert file.status_code == 200 and "://" not in file.text


def test_vqa_as_json_or_form_answers_as_the_predictor_does(app, client, tmp_path):
    image = scene(1)
    (tmp_path / "scene.png").write_bytes(image)
    expected = predictor(app, "vqa").answer(tmp_path / "scene.png", QUESTION)
    as_json = client.post("/v1/vqa", json={"image": base64.b64encode(image).decode(), "question": QUESTION})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == {"model": "vqa", **expected}
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert client.post("/v1/vqa", json={"image": data_url, "question": QUESTION, "model": "vqa"}).json() == as_json.json()
    as_form = client.post("/v1/vqa", files={"image": ("scene.png", image, "image/png")}, data={"question": QUESTION})
    assert as_form.status_code == 200 and as_form.json() == as_json.json()


def test_caption_with_decoding_options(app, client, tmp_path):
    image = scene(2)
    (tmp_path / "scene.png").write_bytes(image)
    captioner = predictor(app, "caption")
    files = {"image": ("scene.png", image, "image/png")}
    plain = client.post("/v1/caption", files=files)
    assert plain.status_code == 200 and plain.json() == {"model": "caption", **captioner.caption(tmp_path / "scene.png")}
    beams = client.post("/v1/caption", files=files, data={"num_beams": "3", "num_return": "3", "max_new_tokens": "5"})
    assert beams.status_code == 200, beams.text
    assert beams.json() == {"model": "caption", **captioner.caption(tmp_path / "scene.png", num_beams=3, num_return=3, max_new_tokens=5)}
    assert len(beams.json()["captions"]) == 3
    wrong = client.post("/v1/caption", files=files, data={"num_return": "2"})
    assert wrong.status_code == 422 and "greedy decoding returns one sequence" in wrong.json()["error"]


def test_search_by_text_or_image_with_thumbnails_of_the_gallery_only(app, client, runs):
    if "index" not in runs:
        pytest.skip("searching needs faiss (the search extra)")
    by_text = client.post("/v1/search", json={"text": QUESTION, "k": 3})
    assert by_text.status_code == 200, by_text.text
    expected = predictor(app, "retrieval").search(runs["index"], text=QUESTION, k=3)
    assert [(h["rank"], h["path"]) for h in by_text.json()["hits"]] == [(h["rank"], h["path"]) for h in expected]
    by_image = client.post("/v1/search", files={"image": ("q.png", (runs["gallery"] / "2.png").read_bytes())}, data={"k": "2"})
    assert by_image.status_code == 200, by_image.text
    best = by_image.json()["hits"][0]
    assert best["path"].endswith("2.png") and best["score"] == pytest.approx(1.0, abs=1e-3)
    assert best["thumbnail"] == "/v1/thumbnail/index/2"
    thumb = client.get(best["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))), np.asarray(Image.open(runs["gallery"] / "2.png")))
    for path, status in (("/v1/thumbnail/index/4", 404), ("/v1/thumbnail/index/-1", 404), ("/v1/thumbnail/other/0", 404),
                         ("/v1/thumbnail/index/..%2F..%2Fetc%2Fpasswd", 404), ("/v1/thumbnail/index/x", 422), ("/page/..%2F__init__.py", 404)):
        response = client.get(path)
        assert response.status_code == status and response.json()["error"], (path, response.text)


def test_explain_draws_the_heat_maps_of_the_served_result(client):
    image = ("scene.png", scene(3), "image/png")
    answer = client.post("/v1/vqa", files={"image": image}, data={"question": QUESTION}).json()
    drawn = client.post("/v1/explain", files={"image": image}, data={"model": "vqa", "question": QUESTION})
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
    assert json.loads(drawn.headers["x-mmt-result"])["answer"] == answer["answer"]
    assert Image.open(io.BytesIO(drawn.content)).size[0] >= 224
    caption = client.post("/v1/caption", files={"image": image}).json()
    drawn = client.post("/v1/explain", files={"image": image}, data={"model": "caption", "layer": "0", "method": "gradcam"})
    assert drawn.status_code == 200 and json.loads(drawn.headers["x-mmt-result"])["caption"] == caption["caption"]
    drawn = client.post("/v1/explain", files={"image": image}, data={"model": "retrieval", "text": QUESTION})
    assert drawn.status_code == 200 and json.loads(drawn.headers["x-mmt-result"])["text"] == QUESTION


TRUNCATED = scene(4)[:300]
CORRUPT = scene(4)[:60] + bytes(200) + scene(4)[260:]
GOOD = scene(5)


@pytest.mark.parametrize("path, request_kwargs, status, reason", [
    ("/v1/vqa", {"files": {"image": ("a.txt", b"hello, not an image")}, "data": {"question": QUESTION}}, 400, "not an image PIL can identify"),
    ("/v1/vqa", {"files": {"image": ("t.png", TRUNCATED)}, "data": {"question": QUESTION}}, 400, "cannot decode image"),
    ("/v1/vqa", {"files": {"image": ("c.png", CORRUPT)}, "data": {"question": QUESTION}}, 400, "cannot decode image"),
    ("/v1/vqa", {"files": {"image": ("big.png", scene(6, side=100))}, "data": {"question": QUESTION}}, 413, "20,000-byte limit"),
    ("/v1/vqa", {"files": {"image": ("wide.png", png(np.zeros((120, 120, 3), np.uint8)))}, "data": {"question": QUESTION}}, 413,
     "120x120 image exceeds the 10,000-pixel limit"),
    ("/v1/vqa", {"json": {"image": "A" * 2_000_000, "question": QUESTION}}, 413, "request body"),
    ("/v1/vqa", {"files": {"image": ("e.png", b"")}, "data": {"question": QUESTION}}, 422, "image: missing or empty"),
    ("/v1/vqa", {"data": {"question": QUESTION}}, 422, "image: missing"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}, "data": {"question": ""}}, 422, "question: String should have at least 1 character"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}, "data": {"question": "   "}}, 422, "question: String should have at least 1"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}}, 422, "question: Field required"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}, "data": {"question": "why " * 300}}, 422, "at most 1000 characters"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}, "data": {"question": QUESTION, "model": "gpt"}}, 404, "model 'gpt' is not served"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD)}, "data": {"question": QUESTION, "model": "caption"}}, 422, "is a caption model"),
    ("/v1/vqa", {"content": b'{"image": "AAAA", "question": ', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("/v1/vqa", {"json": ["not", "an", "object"]}, 400, "must be an object"),
    ("/v1/vqa", {"json": {"image": "not base64!", "question": QUESTION}}, 400, "not valid base64"),
    ("/v1/vqa", {"json": {"image": 7, "question": QUESTION}}, 422, "base64 string"),
    ("/v1/vqa", {"json": {"image_path": "/etc/passwd", "question": QUESTION}}, 422, "image_path: Extra inputs are not permitted"),
    ("/v1/vqa", {"json": {"image": "/etc/passwd", "question": QUESTION}}, 400, "not valid base64"),
    ("/v1/vqa", {"content": b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                 "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 422, "question: Field required"),  # cut short
    ("/v1/vqa", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed form data"),
    ("/v1/vqa", {"content": b"question=hi", "headers": {"content-type": "text/plain"}}, 415, "send application/json or multipart"),
    ("/v1/vqa", {"files": {"image": ("s.png", GOOD), "question": ("q.txt", b"a file")}}, 422, "question: a file where text was expected"),
    ("/v1/caption", {"files": {"image": ("s.png", GOOD)}, "data": {"num_beams": "100"}}, 422, "num_beams: Input should be less than"),
    ("/v1/caption", {"files": {"image": ("s.png", GOOD)}, "data": {"num_beams": "three"}}, 422, "num_beams: Input should be a valid integer"),
    ("/v1/search", {"json": {"text": QUESTION, "image": base64.b64encode(GOOD).decode()}}, 422, "exactly one query"),
    ("/v1/search", {"json": {"k": 3}}, 422, "exactly one query"),
    ("/v1/search", {"json": {"text": QUESTION, "k": 0}}, 422, "k: Input should be greater than or equal to 1"),
    ("/v1/search", {"json": {"text": QUESTION, "index": "nope"}}, 404, "index 'nope' is not served"),
    ("/v1/explain", {"files": {"image": ("s.png", GOOD)}, "data": {"model": "vqa"}}, 422, "explaining a VQA model needs the question"),
    ("/v1/explain", {"files": {"image": ("s.png", GOOD)}, "data": {"model": "vqa", "question": QUESTION, "layer": "9"}}, 422, "layer 9"),
    ("/v1/explain", {"files": {"image": ("s.png", GOOD)}, "data": {"model": "vqa", "question": QUESTION, "method": "x"}}, 422, "method"),
    ("/v1/explain", {"files": {"image": ("s.png", GOOD)}, "data": {"question": QUESTION}}, 422, "model: name the model"),
])
def test_a_bad_request_gets_a_4xx_saying_what_was_wrong(client, runs, path, request_kwargs, status, reason):
    if path == "/v1/search" and "index" not in runs:
        pytest.skip("searching needs faiss (the search extra)")
    response = client.post(path, **request_kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json" and reason in response.json()["error"], response.json()
    assert client.get("/healthz").status_code == 200  # and the server goes on
    assert client.post("/v1/vqa", files={"image": ("s.png", GOOD)}, data={"question": QUESTION}).status_code == 200


def test_unknown_routes_and_methods_answer_in_json(client):
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    assert client.get("/v1/vqa").status_code == 405 and "error" in client.get("/v1/vqa").json()


async def _concurrently(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        return await asyncio.gather(*(client.post(path, **kwargs) for path, kwargs in requests))


def test_concurrent_requests_are_served_in_one_model_call_with_the_same_answers(runs, monkeypatch):
    batched = make_app(runs, Limits(max_wait=1.0), vqa=runs["vqa"], caption=runs["caption"])  # all arrive well within the wait
    one_at_a_time = create_app({name: served.predictor for name, served in batched.state.server.models.items()},
                               limits=Limits(max_batch=1, max_wait=0.0))
    answerer = predictor(batched, "vqa")
    calls = []
    original = type(answerer).answer
    monkeypatch.setattr(answerer, "answer", lambda images, questions, **kw: calls.append(len(images)) or original(answerer, images, questions, **kw))
    questions = [QUESTION, "a blue square", "a green cross on the left", "red", "a circle", "blue", "on the left", "a square"]
    requests = [("/v1/vqa", {"files": {"image": ("s.png", scene(10 + i))}, "data": {"question": q}}) for i, q in enumerate(questions)]
    requests += [("/v1/caption", {"files": {"image": ("s.png", scene(20 + i))}}) for i in range(5)]
    together = asyncio.run(_concurrently(batched, requests))
    assert [r.status_code for r in together] == [200] * len(requests)
    assert calls == [8]  # the Predictor's batched method, once, with every question
    assert list(batched.state.server.models["vqa"].batcher.batch_sizes) == [8]
    assert list(batched.state.server.models["caption"].batcher.batch_sizes) == [5]
    with TestClient(one_at_a_time) as client:
        alone = [client.post(path, **kwargs) for path, kwargs in requests]
    assert list(one_at_a_time.state.server.models["vqa"].batcher.batch_sizes) == [1] * 8
    for a, b in zip(together, alone):
        a, b = a.json(), b.json()
        assert a.pop("score") == pytest.approx(b.pop("score"), abs=2e-4) and a == b
    assert calls == [8] + [1] * 8


def test_healthz_answers_while_the_model_is_busy(runs, monkeypatch):
    app = make_app(runs, vqa=runs["vqa"])
    answerer = predictor(app, "vqa")
    entered, release = threading.Event(), threading.Event()
    original = type(answerer).answer

    def slow(images, questions, **kw):
        entered.set()
        assert release.wait(30)
        return original(answerer, images, questions, **kw)

    monkeypatch.setattr(answerer, "answer", slow)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            busy = asyncio.create_task(client.post("/v1/vqa", files={"image": ("s.png", GOOD)}, data={"question": QUESTION}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await asyncio.wait_for(client.get("/healthz"), 5)
            still_busy = not busy.done()
            release.set()
            return health, still_busy, await busy

    health, still_busy, answered = asyncio.run(scenario())
    assert health.status_code == 200 and still_busy and answered.status_code == 200


def test_one_bad_item_fails_only_its_own_request():
    batcher = Batcher(max_batch=8, max_wait=0.2, name="test")

    def double(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [item * 2 for item in items]

    async def scenario():
        return await asyncio.gather(*(batcher.submit(double, item) for item in ("a", "bad", "c")), return_exceptions=True)

    a, bad, c = asyncio.run(scenario())
    assert (a, c) == ("aa", "cc") and isinstance(bad, ValueError)
    assert list(batcher.batch_sizes) == [3]
    batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(max_batch=0)


def test_models_are_named_by_their_run_folder_or_given_names(tmp_path):
    (tmp_path / "runs" / "vqa" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "vqa" / "model" / "config.json").write_text("{}")
    assert model_specs([str(tmp_path / "runs" / "vqa"), f"small={tmp_path}/runs/vqa", f"x={tmp_path}/runs/vqa/model"]) == {
        "vqa": str(tmp_path / "runs" / "vqa"), "small": f"{tmp_path}/runs/vqa", "x": f"{tmp_path}/runs/vqa/model"}
    with pytest.raises(ConfigError, match="'vqa' is served already"):
        model_specs([str(tmp_path / "runs" / "vqa"), str(tmp_path / "runs" / "vqa" / "model")])


def test_an_index_needs_the_model_it_was_built_with(runs, tmp_path):
    if "index" not in runs:
        pytest.skip("searching needs faiss (the search extra)")
    other, _ = saved(tmp_path, "retrieval-tiny", embed_dim=16)
    with pytest.raises(ConfigError, match="which is not served: serve that run too"):
        create_app({"other": other}, [runs["index"]], device="cpu")
    assert mmt.load(other).task == "retrieval"


def test_mmt_serve_without_its_extra_names_the_extra(tmp_path):
    code = "import sys; sys.modules['fastapi'] = None; import mmt.cli; sys.exit(mmt.cli.main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "serve", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "pip install 'mmt-vl[serve]'" in out.stderr and "fastapi" in out.stderr
