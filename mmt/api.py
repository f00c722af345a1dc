"""Using a trained model from Python: `mmt.load(run_dir)`.

    import mmt
    vqa = mmt.load("runs/vqa")                                 # a run directory or its model/ directory
    vqa.answer("scene.png", "What is the shape of the red object?")   # {"answer": "circle", "score": 0.99}
    captioner = mmt.load("runs/caption")
    captioner.caption(PIL.Image.open("scene.png"), num_beams=3)        # {"caption": ..., "score": ...}
    retrieval = mmt.load("runs/retrieval")
    retrieval.embed_images(["a.png", "b.png"])                         # (2, E) unit-length embeddings
    retrieval.classify("a.png", ["red circle", "blue square"])         # labels ranked, with probabilities

An image is a path, a PIL image, an (H, W, 3) uint8 array, or a float tensor (3, H, W) already
in the model's pixels ([-1, 1], the model's size); one image (or text) gives one result, a list
gives a list. Images go through the same pipeline as in training (`mmt.data.images`). The
model stays in memory and answers in batches of `batch_size`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmt import checkpoint, config
from mmt.data.answers import AnswerVocab
from mmt.data.images import Fit, load_image, to_pixels
from mmt.devices import autocast, autocast_dtype, choose_device, describe
from mmt.errors import CheckpointError
from mmt.generation import GenerationConfig

ANSWERS_NAME = "answers.json"


def _listed(items: Any) -> tuple[list, bool]:
    """(items as a list, whether one item was given). A batched tensor counts as a list."""
    if isinstance(items, (list, tuple)):
        return list(items), False
    if isinstance(items, Tensor) and items.dim() == 4:
        return list(items), False
    return [items], True


def _inference(method):
    """`method` without gradients, under the predictor's autocast (`Predictor.dtype`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return method(self, *args, **kwargs)

    return run


class Predictor:
    """A saved model with its tokenizer (and answer vocabulary), ready to answer, caption or embed.

    Made by `load`. `task` says what the model does: "vqa", "caption", "retrieval" or "t2i"
    (text to image)."""

    def __init__(self, model, tokenizer, directory: Path, generation: GenerationConfig | None = None, dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.directory = model, tokenizer, directory
        self.dtype = dtype  # autocast dtype of every forward pass (None: fp32)
        self.task = model.model_type
        if self.task in ("t2i", "vqvae"):  # models that draw images
            self.image_size = (model.config.image_tokenizer if self.task == "t2i" else model.config).image_size
            self.fit = Fit(self.image_size)
        else:
            self.image_size = model.config.vision.image_size
            self.fit = Fit.of(model.config.vision)  # how images are fitted to the model's square
        self.device = next(model.parameters()).device
        self.generation = generation or GenerationConfig()
        self.answers = None
        if self.task == "vqa" and model.config.head == "classify":
            if not (directory / ANSWERS_NAME).is_file():
                raise CheckpointError(f"{directory / ANSWERS_NAME}: not found; a VQA classifier needs its answer vocabulary beside it")
            self.answers = AnswerVocab.load(directory / ANSWERS_NAME, model.config.num_answers)

    def __repr__(self) -> str:
        return f"Predictor({self.task} model from {self.directory}, {self.image_size}x{self.image_size} images, on {describe(self.device, self.dtype)})"

    # ------------------------------------------------------------------ inputs

    def pixels(self, images: Sequence[Any], first: int = 0) -> Tensor:
        """Model pixels (N, 3, S, S) on the model's device for images of any kind (see the module
        docstring); an ImageError names an image that cannot be read (by its path, or as image
        `first + i` of the caller's list)."""
        arrays, tensors = [], []
        for i, image in enumerate(images):
            name = str(image) if isinstance(image, (str, Path)) else f"image {first + i}"
            if isinstance(image, Tensor):
                if image.shape != (3, self.image_size, self.image_size) or not image.is_floating_point():
                    raise ValueError(
                        f"{name}: a tensor image must be the model's pixels, float (3, {self.image_size}, {self.image_size}) "
                        f"in [-1, 1]; got {tuple(image.shape)} {image.dtype}"
                    )
                tensors.append((i, image.float().cpu()))
            else:
                arrays.append((i, load_image(image, self.fit, name=name)))
        out = torch.empty(len(images), 3, self.image_size, self.image_size)
        if arrays:
            out[[i for i, _ in arrays]] = to_pixels(np.stack([a for _, a in arrays]))
        for i, t in tensors:
            out[i] = t
        return out.to(self.device)

    def decoding(self, options: dict[str, Any]) -> GenerationConfig:
        """The run's decoding settings with `options` (GenerationConfig fields) changed, checked."""
        cfg = dataclasses.replace(self.generation, **options)
        cfg.validate()
        return cfg

    def _need(self, *tasks: str) -> None:
        if self.task not in tasks:
            raise ValueError(f"{self.directory} holds a {self.task} model; this needs a {' or '.join(tasks)} model")

    # ------------------------------------------------------------------ tasks

    @_inference
    def answer(self, images: Any, questions: Any, batch_size: int = 64, **decoding) -> dict | list[dict]:
        """VQA: {"answer", "score"} for each (image, question) pair; `decoding` options (num_beams=3,
        ...) apply to a model that writes its answers."""
        self._need("vqa")
        images, single = _listed(images)
        questions, _ = _listed(questions)
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions: give one question per image")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is {'empty' if isinstance(q, str) else 'not text'}")
        generation = self.decoding(decoding)
        results = []
        for start in range(0, len(images), batch_size):
            pixels = self.pixels(images[start : start + batch_size], start)
            ids, _ = self.tokenizer.batch(questions[start : start + batch_size], self.model.config.text.max_len, wrap="cls")
            ids = ids.to(self.device)
            if self.model.config.head == "generate":  # the answer's probability under the decoder
                out = self.model.generate_answers(
                    pixels, ids, config=generation, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id
                )
                results += self._ranked("answer", out.ids, out.scores.exp())
            else:
                probs = self.model.answer_logits(pixels, ids).float().softmax(-1)
                score, best = probs.max(-1)
                results += [{"answer": self.answers.answers[i], "score": round(s, 4)} for i, s in zip(best.tolist(), score.tolist())]
        return results[0] if single else results

    @_inference
    def caption(self, images: Any, batch_size: int = 64, **decoding) -> dict | list[dict]:
        """Captioning: {"caption", "score"} per image (score: summed log-probability; beam search:
        length-penalised), with all of them under "captions" when `num_return` > 1."""
        self._need("caption")
        images, single = _listed(images)
        generation = self.decoding(decoding)
        results = []
        for start in range(0, len(images), batch_size):
            out = self.model.generate(self.pixels(images[start : start + batch_size], start), generation)
            results += self._ranked("caption", out.ids, out.scores)
        return results[0] if single else results

    @_inference
    def generate_images(self, texts: Any, num: int = 1, batch_size: int = 64, **sampling) -> list[list[Image.Image]]:
        """Text to image: `num` PIL images for each text (a list per text; one text gives one list).
        `sampling` options change the run's (temperature=, top_k=, top_p=, guidance_scale=,
        seed=: with a seed, the same call draws the same images)."""
        self._need("t2i")
        from mmt.tasks.t2i import generate_images

        texts, single = _listed(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is {'empty' if isinstance(text, str) else 'not text'}")
        images = generate_images(self.model, self.tokenizer, texts, self.decoding(sampling), num, batch_size)
        drawn = [[Image.fromarray(image) for image in row] for row in images]
        return drawn[0] if single else drawn

    @_inference
    def embed_images(self, images: Any, batch_size: int = 64) -> Tensor:
        """Retrieval: unit-length image embeddings, (E,) for one image, (N, E) for a list."""
        self._need("retrieval")
        images, single = _listed(images)
        rows = [self.model.embed_images(self.pixels(images[s : s + batch_size], s)).float().cpu() for s in range(0, len(images), batch_size)]
        out = torch.cat(rows) if rows else torch.zeros(0, self.model.config.embed_dim)
        return out[0] if single else out

    @_inference
    def embed_texts(self, texts: Any, batch_size: int = 256) -> Tensor:
        """Retrieval: unit-length text embeddings, (E,) for one text, (N, E) for a list."""
        self._need("retrieval")
        texts, single = _listed(texts)
        rows = []
        for start in range(0, len(texts), batch_size):
            ids, _ = self.tokenizer.batch(texts[start : start + batch_size], self.model.config.text.max_len)
            rows.append(self.model.embed_texts(ids.to(self.device)).float().cpu())
        out = torch.cat(rows) if rows else torch.zeros(0, self.model.config.embed_dim)
        return out[0] if single else out

    def search(self, index: Any, text: str | None = None, image: Any = None, k: int = 10) -> list[dict[str, Any]]:
        """Retrieval: the `k` gallery images of `index` (an `mmt index` folder, or an
        `mmt.search.SearchIndex`) that best match `text` or `image` (exactly one), best first:
        [{"rank", "path", "score"}, ...]. The index must have been built with this model."""
        from mmt.search import SearchIndex, SearchIndexError, hits, model_fingerprint

        self._need("retrieval")
        if (text is None) == (image is None):
            raise ValueError("give exactly one query: text=... or image=...")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError("the query text is empty")
        index = index if isinstance(index, SearchIndex) else SearchIndex.load(index)
        if model_fingerprint(self.directory) != index.manifest["model_fingerprint"]:
            raise SearchIndexError(f"{index.directory} was built with another model ({index.manifest['model_dir']}); "
                                   f"search it with that model or rebuild it with {self.directory}")
        query = self.embed_texts([text]) if text is not None else self.embed_images([image])
        return hits(*index.search(query.numpy(), k))

    def classify(self, images: Any, labels: Sequence[str], template: str = "{}", batch_size: int = 64) -> dict | list[dict]:
        """Zero-shot classification: each image's labels ranked by a softmax over the temperature-
        scaled cosine between the image and `template.format(label)`:
        {"label", "score", "labels": [{"label", "score"}, ...]}."""
        self._need("retrieval")
        labels = prompts(labels, template)
        images, single = _listed(images)
        label_emb = self.embed_texts([template.format(label) for label in labels])
        image_emb = self.embed_images(images, batch_size)
        probs = torch.softmax(self.model.scale().detach().cpu() * image_emb @ label_emb.T, dim=1)
        results = []
        for row in probs.tolist():
            ranked = sorted(zip(labels, row), key=lambda pair: -pair[1])
            results.append({"label": ranked[0][0], "score": round(ranked[0][1], 4),
                            "labels": [{"label": label, "score": round(p, 4)} for label, p in ranked]})
        return results[0] if single else results

    def _ranked(self, key: str, ids: Tensor, scores: Tensor) -> list[dict[str, Any]]:
        """Per input, the best text under `key` with its score, and all `num_return` of them
        under `key + "s"` when there are several. ids (B, R, L), scores (B, R), best first."""
        results = []
        for rows, row_scores in zip(ids.cpu(), scores.cpu().tolist()):
            ranked = [{key: self.tokenizer.decode(row), "score": round(score, 4)} for row, score in zip(rows, row_scores)]
            results.append({**ranked[0], key + "s": ranked} if len(ranked) > 1 else ranked[0])
        return results


def prompts(labels: Sequence[str], template: str) -> list[str]:
    """The labels of a zero-shot classification, stripped, after checking them and the template."""
    labels = [label.strip() for label in labels if label.strip()]
    if not labels:
        raise ValueError('zero-shot classification needs labels, e.g. "a red circle,a blue square"')
    if "{}" not in template:
        raise ValueError(f"template {template!r} needs a {{}} where the label goes")
    return labels


def run_settings(path: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The run config saved beside a model (run_config.json in the run or model directory) and
    the file it came from, or ({}, None)."""
    directory = Path(path)
    for candidate in (directory / "run_config.json", checkpoint.model_directory(directory) / "run_config.json"):
        if candidate.is_file():
            return config.read_data(candidate), candidate
    return {}, None


def saved_run_config(config_class, data: dict, path: Path):
    """A saved run config (`run_config.json`'s data, read from `path`) over the task's defaults
    (`config_class`): a section or key that an older version did not write keeps the task's
    default, except the attention kernel, which a run of mmt 0.1 chose in its model config and
    keeps. The model section is read on its own, as a saved model config is."""
    try:
        cfg = config.merge(config_class(), {k: v for k, v in data.items() if k not in ("task", "model")})
        if "model" in data:
            cfg.model = config.from_dict(type(cfg.model), data["model"], saved=True)
            if "attention" not in data.get("train", {}):
                cfg.train.attention = config.attention_of_old_model(data["model"]) or cfg.train.attention
        return cfg
    except config.ConfigError as e:
        raise config.ConfigError(f"{path}: {e}") from None


def load(
    path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None, overrides: Sequence[str] = ()
) -> Predictor:
    """The model saved in `path` (a run directory or a model directory), in eval mode, with its
    tokenizer and the run's decoding settings.

    Args:
        device: "auto" (a GPU when torch sees one, else the CPU), "cpu", "cuda", "cuda:1", ...
        dtype: None or "fp32" (default), or autocast in "bf16" / "fp16" (or torch.bfloat16,
            torch.float16); "auto": bf16 where the hardware has it, fp16 on other GPUs.
            The weights stay fp32.
        overrides: ("generation.num_beams=3", "model.rerank_k=32") change the saved settings,
            as `--set` does.
    """
    target = choose_device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not one of torch.float32, torch.bfloat16, torch.float16")
        amp = None if dtype == torch.float32 else dtype
    else:
        amp = autocast_dtype(dtype or "fp32", target)
    model_dir = checkpoint.model_directory(path)
    settings, settings_file = run_settings(path)
    model_type, model_cfg = checkpoint.read_config(model_dir)
    # the run's decoding settings; without them, texts as long as the model's positions allow
    try:
        generation = config.from_dict(GenerationConfig, settings.get("generation", {"max_new_tokens": 10_000}), saved=True)
    except config.ConfigError as e:
        raise config.ConfigError(f"{settings_file}: generation: {e}") from None
    model_overrides = [o for o in overrides if o.startswith("model.")]
    generation = config.apply_overrides(generation, [o.split(".", 1)[1] for o in overrides if o.startswith("generation.")])
    unknown = [o for o in overrides if not o.startswith(("model.", "generation."))]
    if unknown:
        raise config.ConfigError(f"{unknown[0]}: only model.* and generation.* settings apply to a saved model")
    model_cfg = config.apply_overrides(model_cfg, [o.split(".", 1)[1] for o in model_overrides])
    model, tokenizer, _ = checkpoint.load_for_inference(model_dir, model_cfg)
    return Predictor(model.to(target), tokenizer, model_dir, generation, amp)
