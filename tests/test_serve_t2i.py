"""`mmt serve`'s text to image (POST /v1/generate) with a tiny t2i run trained on the command
line: the images are the Predictor's, a seed draws the same images, unseeded requests share a
batch, every bad input is a 4xx naming its field."""

import asyncio
import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="mmt serve needs the serve extra (fastapi, uvicorn, python-multipart)")
httpx = pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

import mmt  # noqa: E402
from mmt.cli import main  # noqa: E402
from mmt.serve.app import Limits, create_app  # noqa: E402
from tests.tasks.test_t2i import TINY_T2I, TINY_VQVAE, sets  # noqa: E402
from tests.test_api import saved  # noqa: E402

pytestmark = pytest.mark.e2e
TEXT = "a small red circle"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"t2i": a tiny text-to-image run (32 px), "vqa": a tiny random VQA run}."""
    from mmt.data.answers import AnswerVocab

    root = tmp_path_factory.mktemp("serve-t2i")
    assert main(["train", "vqvae", str(root / "vqvae"), "--preset", "vqvae-tiny", "--no-progress", *sets(TINY_VQVAE)]) == 0
    args = ["train", "t2i", str(root / "t2i"), "--preset", "t2i-tiny", "--no-progress", *sets(TINY_T2I + [f"image_tokenizer={root / 'vqvae'}"])]
    assert main(args) == 0
    vqa, _ = saved(root, "vqa-small", num_answers=3)
    AnswerVocab(["yes", "no", "2"]).save(vqa / "answers.json")
    return {"t2i": root / "t2i", "vqa": vqa}


@pytest.fixture(scope="module")
def app(runs):
    return create_app({"t2i": runs["t2i"], "vqa": runs["vqa"]}, limits=Limits(max_wait=0.005), device="cpu")


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def pictures(response) -> list[np.ndarray]:
    urls = response.json()["images"]
    assert all(url.startswith("data:image/png;base64,") for url in urls)
    images = [Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) for url in urls]
    assert all(image.format == "PNG" for image in images)
    return [np.asarray(image.convert("RGB")) for image in images]


def test_models_lists_the_t2i_run(client):
    served = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert served["t2i"]["task"] == "t2i" and served["t2i"]["image_size"] == 32
    spec = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"text", "num", "seed", "guidance_scale"} <= spec["application/json"]["schema"]["properties"].keys()
    assert "image" not in spec["application/json"]["schema"]["properties"]


def test_generate_draws_the_predictors_images_and_a_seed_draws_them_again(app, client):
    response = client.post("/v1/generate", json={"text": f"  {TEXT} ", "num": 3, "seed": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["text"], body["seed"]) == ("t2i", TEXT, 5)
    drawn = pictures(response)
    assert [image.shape for image in drawn] == [(32, 32, 3)] * 3
    expected = app.state.server.models["t2i"].predictor.generate_images(TEXT, num=3, seed=5)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(drawn, expected))
    again = client.post("/v1/generate", data={"text": TEXT, "num": "3", "seed": "5", "model": "t2i"})  # as form data
    assert again.status_code == 200 and again.json()["images"] == body["images"]
    other = client.post("/v1/generate", json={"text": TEXT, "num": 3, "seed": 6, "guidance_scale": 1, "top_k": 4, "top_p": 0.9,
                                              "temperature": 0.8})
    assert other.status_code == 200 and other.json()["images"] != body["images"]
    default = client.post("/v1/generate", json={"text": TEXT})
    assert default.status_code == 200 and len(pictures(default)) == 4
    assert default.json()["seed"] == mmt.load(app.state.server.models["t2i"].predictor.directory).generation.seed  # the run's


async def _concurrently(app, bodies):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
        return await asyncio.gather(*(client.post("/v1/generate", json=body) for body in bodies))


def test_unseeded_requests_share_a_batch_and_seeded_ones_are_drawn_alone(runs):
    predictor = mmt.load(runs["t2i"], device="cpu")
    predictor.generation = dataclasses.replace(predictor.generation, seed=None)  # as a run saved without a seed
    app = create_app({"t2i": predictor}, limits=Limits(max_wait=1.0))  # all arrive well within the wait
    texts = [TEXT, "two squares", "a blue triangle", "a green circle on the left"]
    unseeded = asyncio.run(_concurrently(app, [{"text": t, "num": 2} for t in texts]))
    assert [r.status_code for r in unseeded] == [200] * 4 and all(len(pictures(r)) == 2 for r in unseeded)
    assert all(r.json()["seed"] is None for r in unseeded)
    batcher = app.state.server.models["t2i"].batcher
    assert list(batcher.batch_sizes) == [4]
    seeded = asyncio.run(_concurrently(app, [{"text": t, "num": 2, "seed": 1} for t in texts]))
    assert [r.status_code for r in seeded] == [200] * 4 and list(batcher.batch_sizes) == [4, 1, 1, 1, 1]
    alone = predictor.generate_images(texts[1], num=2, seed=1)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(pictures(seeded[1]), alone))  # as if it came alone


@pytest.mark.parametrize("request_kwargs, status, reason", [
    ({"json": {"text": ""}}, 422, "text: String should have at least 1 character"),
    ({"json": {"text": "   "}}, 422, "text: String should have at least 1 character"),
    ({"json": {"num": 2}}, 422, "text: Field required"),
    ({"json": {"text": "red " * 300}}, 422, "text: String should have at most 1000 characters"),
    ({"json": {"text": 7}}, 422, "text: Input should be a valid string"),
    ({"json": {"text": TEXT, "num": 0}}, 422, "num: Input should be greater than or equal to 1"),
    ({"json": {"text": TEXT, "num": 9}}, 422, "num: Input should be less than or equal to 8"),
    ({"json": {"text": TEXT, "num": "many"}}, 422, "num: Input should be a valid integer"),
    ({"json": {"text": TEXT, "seed": -1}}, 422, "seed: Input should be greater than or equal to 0"),
    ({"json": {"text": TEXT, "seed": 2**64}}, 422, "seed: Input should be less than"),
    ({"json": {"text": TEXT, "seed": 1.5}}, 422, "seed: Input should be a valid integer"),
    ({"json": {"text": TEXT, "guidance_scale": -0.5}}, 422, "guidance_scale: Input should be greater than or equal to 0"),
    ({"json": {"text": TEXT, "guidance_scale": "strong"}}, 422, "guidance_scale: Input should be a valid number"),
    ({"content": b'{"text": "a circle", "guidance_scale": NaN}', "headers": {"content-type": "application/json"}}, 422, "guidance_scale: "),
    ({"json": {"text": TEXT, "temperature": 0}}, 422, "temperature: Input should be greater than 0"),
    ({"json": {"text": TEXT, "top_k": -1}}, 422, "top_k: Input should be greater than or equal to 0"),
    ({"json": {"text": TEXT, "top_p": 0}}, 422, "top_p: Input should be greater than 0"),
    ({"json": {"text": TEXT, "top_p": 1.5}}, 422, "top_p: Input should be less than or equal to 1"),
    ({"json": {"text": TEXT, "steps": 10}}, 422, "steps: Extra inputs are not permitted"),
    ({"json": {"text": TEXT, "image": "AAAA"}}, 422, "image: /v1/generate draws images from a text"),
    ({"json": {"text": TEXT, "model": "dalle"}}, 404, "model 'dalle' is not served"),
    ({"json": {"text": TEXT, "model": "vqa"}}, 422, "model 'vqa' is a vqa model; this needs a t2i model"),
    ({"json": [TEXT]}, 400, "must be an object"),
    ({"content": TEXT.encode(), "headers": {"content-type": "text/plain"}}, 415, "send application/json or multipart"),
])
def test_a_bad_generate_request_gets_a_4xx_naming_its_field(client, request_kwargs, status, reason):
    response = client.post("/v1/generate", **request_kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json" and reason in response.json()["error"], response.json()


def test_other_endpoints_refuse_the_t2i_model(client):
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(out, "PNG")
    image = {"image": ("s.png", out.getvalue())}
    explained = client.post("/v1/explain", files=image, data={"model": "t2i"})
    assert explained.status_code == 422 and "explain needs a vqa, caption or retrieval model" in explained.json()["error"]
    asked = client.post("/v1/vqa", files=image, data={"question": "a red circle", "model": "t2i"})
    assert asked.status_code == 422 and "is a t2i model" in asked.json()["error"]
