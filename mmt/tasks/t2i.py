"""Text-to-image generation on the shapes world, in two stages (the `Task` protocol, `mmt.tasks.base`):

    mmt train vqvae runs/vqvae      the image tokenizer: 64x64 images <-> 8x8 codes
    mmt train t2i runs/t2i          the generator: caption -> codes, over the tokenizer's codes

Both stages read the text-to-image world (`mmt.data.worlds.shapes_t2i`): one prompt per image
that states everything the image must hold, with some colour-shape pairs held out of every
training image and caption (`data.held_out`). The tokenizer is judged by how faithfully it
redraws test images: PSNR, codebook use, and how often the scene parser recovers the scene
exactly from the reconstruction. The generator is judged by the compositional prompt suite
(`mmt.metrics.t2i`): four images per prompt, parsed, each right when it shows exactly what its
prompt states; per category, on seen pairs and on held-out ones.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmt import checkpoint, registry
from mmt.config import Amount, Count, Settings
from mmt.data.images import from_pixels, to_pixels
from mmt.data.progress import bar
from mmt.data.worlds import shapes, shapes_t2i
from mmt.data.worlds.shapes_parse import parse, same_scene
from mmt.generation import GenerationConfig
from mmt.metrics.t2i import format_table, suite_scores
from mmt.models.t2i import T2IConfig, T2IModel
from mmt.models.vqvae import VQVAE, VQVAEConfig, psnr
from mmt.tasks.base import Task
from mmt.tasks.common import epoch_order, init_tokenizer, share, unknown_words
from mmt.text import Tokenizer
from mmt.train import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class T2IDataConfig(Settings):
    """Which text-to-image world to generate."""

    num_train: Count = 20000  # training images, one prompt each
    num_val: Count = 500  # the tokenizer's validation images
    num_test: Count = 1000  # the tokenizer's test images (`mmt eval` on a vqvae run)
    seed: Amount = 0  # generation seed; each split uses its own stream of it
    image_size: Count = shapes_t2i.IMAGE_SIZE  # rendered image side in pixels (the model's image_size)
    # colour-shape pairs that no training image or caption holds ("colour shape"); the suite's
    # held-out prompts ask for them
    held_out: tuple[str, ...] = tuple(f"{colour} {shape}" for colour, shape in shapes_t2i.HELD_OUT)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """`held_out` as (colour, shape) pairs, checked."""
        pairs = []
        for text in self.held_out:
            words = text.split()
            if len(words) != 2 or words[0] not in shapes_t2i.COLOURS or words[1] not in shapes_t2i.SHAPES:
                raise ValueError(f"data.held_out: {text!r} is not 'colour shape' (colours {', '.join(shapes_t2i.COLOURS)}; "
                                 f"shapes {', '.join(shapes_t2i.SHAPES)})")
            pairs.append((words[0], words[1]))
        return tuple(pairs)

    def split(self, name: str) -> shapes_t2i.T2ISplit:
        """"train", "val" or "test" (no held-out pair anywhere), or "held": num_test scenes each
        holding one held-out pair (drawn for held-out prompts), to measure the tokenizer on them."""
        if name == "held":
            return held_split(self.num_test, self.seed, self.pairs(), self.image_size)
        number = {"train": self.num_train, "val": self.num_val, "test": self.num_test}[name]
        stream = ("train", "val", "test").index(name)
        return shapes_t2i.T2ISplit.generate(number, self.seed, self.pairs(), self.image_size, stream=stream)


def held_split(num_images: int, seed: int, held_out, image_size: int) -> shapes_t2i.T2ISplit:
    """Scenes for random held-out prompts (categories but counting, uniform), each with one held-out pair."""
    draws = shapes.Draws(np.random.default_rng([seed, 3]))
    categories = [c for c in shapes_t2i.CATEGORIES if c != "counting"]
    prompts = [shapes_t2i.sample_prompt(draws, draws.choice(categories), held_out, held=True) for _ in range(num_images)]
    scenes = [shapes_t2i.scene_for(p, draws, held_out, allow_held=True, image_size=image_size) for p in prompts]
    images = np.stack([shapes.render(scene) for scene in scenes]) if scenes else np.zeros((0, image_size, image_size, 3), np.uint8)
    return shapes_t2i.T2ISplit(images, [p.text for p in prompts], scenes, prompts)


# ----------------------------------------------------------------------------- the image tokenizer


@dataclasses.dataclass
class VQVAERunConfig(Settings):
    """Everything a `mmt train vqvae` run needs."""

    model: VQVAEConfig = dataclasses.field(default_factory=lambda: registry.preset("vqvae-small"))
    data: T2IDataConfig = dataclasses.field(default_factory=T2IDataConfig)
    train: TrainConfig = dataclasses.field(
        # fp32: which code is nearest turns on small differences that bf16 would round away
        default_factory=lambda: TrainConfig(
            steps=4000, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.0, eval_every=1000, save_every=500, precision="fp32"
        )
    )


@torch.no_grad()
def reconstruction_scores(model: VQVAE, split: shapes_t2i.T2ISplit, batch_size: int = 250) -> dict[str, float]:
    """How faithfully `model` redraws the images of `split`: PSNR (dB), the share of scenes the
    parser recovers exactly from the reconstruction, and the codebook's use over the split."""
    model.eval()
    device = next(model.parameters()).device
    psnrs, exact, use = [], 0, torch.zeros(model.config.codebook_size)
    for start in range(0, len(split), batch_size):
        pixels = to_pixels(split.images[start : start + batch_size]).to(device)
        codes = model.encode(pixels)
        redrawn = model.decode(codes)
        psnrs.append(psnr(redrawn, pixels).cpu())
        use += torch.bincount(codes.flatten().cpu(), minlength=len(use)).float()
        for image, scene in zip(from_pixels(redrawn), split.scenes[start : start + batch_size]):
            exact += same_scene(parse(image), scene)
    p = use / use.sum()
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "parse_exact": exact / len(split),
        "perplexity": float(torch.exp(-(p * p.clamp_min(1e-10).log()).sum())),
        "codes_used": float((use > 0).float().mean()),
    }


class VQVAETask(Task):
    name = "vqvae"
    run_config = VQVAERunConfig
    cfg: VQVAERunConfig

    def prepare(self, run_dir: Path) -> VQVAEConfig:
        cfg = self.cfg
        if cfg.model.image_size != cfg.data.image_size:
            raise ValueError(f"model.image_size={cfg.model.image_size} but data.image_size={cfg.data.image_size}: set them equal")
        self.train_pixels = to_pixels(cfg.data.split("train").images)
        self.val_split = cfg.data.split("val")
        return copy.deepcopy(cfg.model)

    def build_model(self, model_cfg: VQVAEConfig) -> VQVAE:
        return VQVAE(model_cfg)

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        images = share(epoch_order(self.cfg.train.seed, step, self.cfg.train.batch_size, len(self.train_pixels)), part, parts)
        return {"pixels": self.train_pixels[torch.as_tensor(images)]}

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Pixels redrawn within 8/255 on every channel."""
        return out["pixels_right"].item(), int(out["pixels"].item())

    @staticmethod
    def batch_samples(batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pixels"])

    def evaluate(self, model: VQVAE) -> dict[str, float]:
        return reconstruction_scores(model, self.val_split)

    @staticmethod
    def headline(result: dict[str, float]) -> dict[str, float]:
        return {k: result[k] for k in ("psnr", "parse_exact", "codes_used")}

    @staticmethod
    def score(result: dict[str, float]) -> float:
        return result["parse_exact"] + result["psnr"] / 1000  # (PSNR breaks ties)

    @staticmethod
    def format_result(result: dict[str, float]) -> str:
        return "\n".join([
            f"PSNR               {result['psnr']:.2f} dB",
            f"scenes parsed exactly from the reconstruction  {100 * result['parse_exact']:.1f}%",
            f"codebook perplexity {result['perplexity']:.1f}; share of codes used {100 * result['codes_used']:.1f}%",
        ])

    def save_model(self, model: VQVAE, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory)

    def test(self, model: VQVAE, tokenizer, directory: Path, out: Path) -> tuple[dict, str]:
        """The test images, and as many scenes holding a held-out pair (which training never showed)."""
        test, held = self.cfg.data.split("test"), self.cfg.data.split("held")
        result = reconstruction_scores(model, test)
        on_held = reconstruction_scores(model, held)
        result |= {f"held_{k}": v for k, v in on_held.items()}
        report = [f"{len(test)} test images redrawn", self.format_result(result),
                  f"{len(held)} scenes with a held-out colour-shape pair redrawn", self.format_result(on_held)]
        return result, "\n".join(report)


# ----------------------------------------------------------------------------- the generator


@dataclasses.dataclass
class T2IRunConfig(Settings):
    """Everything a `mmt train t2i` run needs."""

    model: T2IConfig = dataclasses.field(default_factory=lambda: registry.preset("t2i-small"))
    data: T2IDataConfig = dataclasses.field(default_factory=T2IDataConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=3000, batch_size=64, lr=1e-3, warmup_steps=200, eval_every=1000, save_every=500)
    )
    image_tokenizer: str = "runs/vqvae"  # the `mmt train vqvae` run (or model directory) whose codes the generator writes
    # sampling for the evaluation and `mmt generate`; max_new_tokens is the code grid's size
    # (guidance off by default: on the validation prompts, scale 1 scored 0.375, 3 0.323, 5 0.141;
    # docs/results/t2i.md)
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(do_sample=True, seed=0))
    images_per_prompt: Count = 4  # the compositional suite draws this many images per prompt


@torch.no_grad()
def generate_images(
    model: T2IModel, tokenizer: Tokenizer, texts: list[str], generation: GenerationConfig, num: int = 1, batch_size: int = 64,
) -> np.ndarray:
    """`num` images for each text: uint8 (len(texts), num, H, W, 3). Sampling settings come from
    `generation` (its num_return is `num`); with a sampling seed, batch b uses seed + b."""
    model.eval()
    device = next(model.parameters()).device
    longest = model.config.text.max_len
    for i, row in enumerate(tokenizer.batch(texts, 10_000)[0]):
        if int((row != tokenizer.pad_id).sum()) > longest:
            raise ValueError(f"text {i} is longer than the model reads ({longest} tokens with [CLS] and [SEP]): {texts[i]!r}")
    unknown = unknown_words(tokenizer, texts)
    if unknown:
        log.warning(f"words the model never read, drawn as [UNK]: {', '.join(list(unknown)[:10])}")
    images = []
    for b, start in enumerate(bar(range(0, len(texts), batch_size), desc="generate", unit="batch")):
        ids, _ = tokenizer.batch(texts[start : start + batch_size], longest)
        seed = None if generation.seed is None else generation.seed + b
        pixels = model.generate(ids.to(device), generation, num_return=num, seed=seed)
        images.append(from_pixels(pixels.flatten(0, 1)).reshape(*pixels.shape[:2], *pixels.shape[3:], 3))
    return np.concatenate(images) if images else np.zeros((0, num, 1, 1, 3), np.uint8)


def grid_image(images: np.ndarray, gap: int = 2) -> Image.Image:
    """(rows, cols, H, W, 3) uint8 -> one picture, white gaps between the images."""
    rows, cols, H, W, _ = images.shape
    canvas = np.full((rows * (H + gap) - gap, cols * (W + gap) - gap, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            canvas[r * (H + gap) : r * (H + gap) + H, c * (W + gap) : c * (W + gap) + W] = images[r, c]
    return Image.fromarray(canvas)


class T2ITask(Task):
    name = "t2i"
    run_config = T2IRunConfig
    cfg: T2IRunConfig

    def prepare(self, run_dir: Path) -> T2IConfig:
        cfg, model = self.cfg, copy.deepcopy(self.cfg.model)
        self.image_tokenizer = load_image_tokenizer(cfg.image_tokenizer)
        model.image_tokenizer = self.image_tokenizer.config
        if model.image_tokenizer.image_size != cfg.data.image_size:
            raise ValueError(f"image_tokenizer={cfg.image_tokenizer} reads {model.image_tokenizer.image_size}x{model.image_tokenizer.image_size} "
                             f"images but data.image_size={cfg.data.image_size}: set them equal")
        train = cfg.data.split("train")
        self.tokenizer = init_tokenizer(run_dir, cfg.train, lambda: train.captions)
        model.text.vocab_size = self.tokenizer.vocab_size
        self.caption_ids, _ = self.tokenizer.batch(train.captions, 10_000)  # [CLS] caption [SEP]
        model.text.max_len = max(model.text.max_len, self.caption_ids.shape[1])
        started = time.perf_counter()
        self.codes = encode_images(self.image_tokenizer, train.images)
        log.info(f"{len(train)} training images turned into {tuple(self.codes.shape[1:])} codes in {time.perf_counter() - started:.1f}s")
        self.model_cfg = model
        return model

    def build_model(self, model_cfg: T2IConfig) -> T2IModel:
        model = T2IModel(model_cfg)
        model.image_tokenizer.load_state_dict(self.image_tokenizer.state_dict())
        return model

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        """B images of seeded epoch permutations with their captions; a seeded share of the
        captions (model.null_text_rate) replaced by "no text"; share `part` of `parts`."""
        B = self.cfg.train.batch_size
        images = epoch_order(self.cfg.train.seed, step, B, len(self.codes))
        drop = np.random.default_rng([self.cfg.train.seed, 2_000_003, step]).random(B) < self.model_cfg.null_text_rate
        mine = share(np.arange(B), part, parts)
        rows = torch.as_tensor(images[mine])
        ids = self.caption_ids[rows]
        ids = ids[:, : int((ids != self.tokenizer.pad_id).sum(1).max())]
        return {"caption_ids": ids, "codes": self.codes[rows], "drop_text": torch.as_tensor(drop[mine])}

    @staticmethod
    def loss_terms(batch: dict[str, torch.Tensor]) -> int:
        return batch["codes"].numel()

    @staticmethod
    def batch_samples(batch: dict[str, torch.Tensor]) -> int:
        """Images in a batch: what samples/s counts."""
        return len(batch["codes"])

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Teacher-forced next-code accuracy."""
        return out["tokens_correct"].item(), int(out["tokens"].item())

    def evaluate(self, model: T2IModel) -> dict:
        """The validation prompts: a suite drawn like the test suite from another seed (1)."""
        return self._suite(model, self.tokenizer, suite_seed=1)[0]

    def _suite(self, model: T2IModel, tokenizer: Tokenizer, suite_seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
        """Scores of a compositional suite (`mmt eval`: the fixed one, seed 0), flat (seen_*,
        held_*), and the images drawn."""
        seen, held = shapes_t2i.prompt_suite(self.cfg.data.pairs(), seed=suite_seed)
        result, drawn = {}, {}
        for name, prompts in (("seen", seen), ("held", held)):
            images = generate_images(model, tokenizer, [p.text for p in prompts], self.cfg.generation, self.cfg.images_per_prompt)
            scores = suite_scores(prompts, [list(row) for row in images])
            result[f"{name}_overall"] = scores["overall"]
            result |= {f"{name}_{category}": value for category, value in scores["categories"].items()}
            result[f"{name}_diversity"] = scores["diversity"]
            result[f"{name}_scores"] = scores
            drawn[name] = images
        return result, drawn

    @staticmethod
    def headline(result: dict) -> dict[str, float]:
        return {k: result[k] for k in ("seen_overall", "held_overall")}

    @staticmethod
    def score(result: dict) -> float:
        return result["seen_overall"]

    @staticmethod
    def format_result(result: dict) -> str:
        return format_table(result["seen_scores"], result["held_scores"])

    def save_model(self, model: T2IModel, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory, self.tokenizer)

    def test(self, model: T2IModel, tokenizer: Tokenizer, directory: Path, out: Path) -> tuple[dict, str]:
        """The compositional suite, with a picture of every prompt's images beside `out`."""
        started = time.perf_counter()
        result, drawn = self._suite(model, tokenizer)
        seconds = time.perf_counter() - started
        pictures = []
        for name, images in drawn.items():
            path = out.with_name(f"{out.stem}_{name}.png")
            grid_image(images).save(path)
            pictures.append(f"{name} prompts' images (a row per prompt, in suite order) in {path}")
        count = sum(len(images) * images.shape[1] for images in drawn.values())
        g = self.cfg.generation
        report = [
            f"{count} images drawn in {seconds:.1f}s (sampling, temperature {g.temperature}, top-k {g.top_k or 'off'}, "
            f"top-p {g.top_p}, guidance {g.guidance_scale})",
            format_table(result["seen_scores"], result["held_scores"]),
        ]
        return result, "\n".join(report + pictures)


def load_image_tokenizer(path: str) -> VQVAE:
    """The VQ-VAE of a `mmt train vqvae` run (or model directory), in eval mode."""
    if not path:
        raise ValueError("image_tokenizer: give the `mmt train vqvae` run whose codes the generator writes")
    model = checkpoint.from_pretrained(path)
    if not isinstance(model, VQVAE):
        raise checkpoint.CheckpointError(f"image_tokenizer={path}: holds a {model.model_type} model, not a vqvae (train one with `mmt train vqvae`)")
    return model


@torch.no_grad()
def encode_images(model: VQVAE, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> codes (N, h, w)."""
    model.eval()
    return torch.cat([model.encode(to_pixels(images[start : start + batch_size])) for start in range(0, len(images), batch_size)])
