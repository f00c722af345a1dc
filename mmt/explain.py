"""Where a model looked: heat maps over the image for a VQA answer, each word of a caption, or
an image-text match, one API for every model (`explain`).

Two kinds of map, over the vision tower's token grid (spread over the image to draw it):

- **attention** (VQA with cross fusion, captioning): the weights with which the query (VQA's
  [CLS] question state; the caption position that writes the word) attends to the image
  tokens in the model's cross-modal attention, softmax(QKᵀ/√d_k + bias) as the layer computes
  it (`MultiHeadAttention.weights`, read through a forward hook: no layer changes). `layer`
  picks the first cross-attention layer, the last, their mean, or one by number; "auto" (the
  default) is the first for VQA (where the question meets the image) and the mean for a
  caption word (the first layer's query there is the word before, which does not yet know
  what comes next). `head` is the mean over heads or one head.
- **gradient**: |∑_d G_id X_id| per image token, with X (N, D) the image tokens and G the
  gradient of the explained score (the answer's logit, the word's log-probability, the
  image-text cosine) with respect to them (gradient × input). Every model has it, the
  retrieval dual encoder only this one. **gradcam** is Grad-CAM (Selvaraju et al. 2017) on the
  same tokens: ReLU(∑_d a_d X_id) with a_d the mean of G_id over the tokens.

How often each kind peaks on the object a question names, on the built-in worlds' test
scenes: docs/results/explain.md (`benchmarks/explain_hits.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from mmt.api import Predictor
from mmt.data.images import from_pixels
from mmt.layers.attention import MultiHeadAttention

METHODS = ("attention", "gradient", "gradcam")


@dataclasses.dataclass
class Explanation:
    """What was explained: the picture the model saw, the result, and one map per panel
    ((rows, cols) over the token grid, scaled to a maximum of 1; all zero where nothing in the
    image raised the score)."""

    image: np.ndarray  # (S, S, 3) uint8
    result: dict[str, Any]  # the answer, caption or match, with its score
    labels: list[str]  # one per map: the answer, each word, or the text
    maps: list[np.ndarray]


def _scaled(heat: Tensor, grid: tuple[int, int]) -> np.ndarray:
    heat = heat.detach().float().cpu()
    top = heat.max()
    return (heat / top if top > 0 else heat).reshape(grid).numpy()


def token_gradient(image_tokens: Tensor, score: Tensor, grid: tuple[int, int], method: str, first: int = 0) -> np.ndarray:
    """The gradient map of `score` (a scalar depending on `image_tokens` (1, first + N, D)) over
    the grid's N tokens (`first`: tokens before them, a class token)."""
    (grad,) = torch.autograd.grad(score, image_tokens, retain_graph=True)
    grad, tokens = grad[:, first:], image_tokens.detach().float()[:, first:]
    if method == "gradcam":
        heat = torch.relu((tokens * grad.float().mean(dim=1, keepdim=True)).sum(-1))[0]
    else:
        heat = (tokens * grad.float()).sum(-1).abs()[0]
    return _scaled(heat, grid)


@contextlib.contextmanager
def cross_attention(model: torch.nn.Module, num_image_tokens: int):
    """Record, while inside, the weights (B, H, T, N) of every cross-attention over the image
    tokens, in call order (one entry per layer for one forward pass)."""
    recorded: list[Tensor] = []

    def hook(module, args, kwargs, output):
        context = args[1] if len(args) > 1 else kwargs.get("context")
        kv = kwargs.get("kv")
        keys = kv.k.shape[-2] if kv is not None else (context.shape[1] if context is not None else None)
        if keys != num_image_tokens:
            return  # self-attention, or attention over something other than the image
        with torch.no_grad():
            recorded.append(module.weights(args[0], context, kv=kv, key_padding_mask=kwargs.get("key_padding_mask"),
                                           bias=kwargs.get("bias")).float())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, MultiHeadAttention)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _pick(recorded: list[Tensor], layer: str | int, head: str | int) -> Tensor:
    """(B, T, N) weights of the chosen layer(s) and head(s)."""
    if not recorded:
        raise ValueError("this model has no cross-modal attention over the image (e.g. joint fusion): use method='gradient'")
    rows = min(w.shape[2] for w in recorded)  # (a last layer may compute only the queries read, e.g. VQA's [CLS])
    stack = torch.stack([w[:, :, :rows] for w in recorded])  # (L, B, H, T, N)
    if layer == "first":
        chosen = stack[0]
    elif layer == "last":
        chosen = stack[-1]
    elif layer == "mean":
        chosen = stack.mean(0)
    elif isinstance(layer, int) and -len(recorded) <= layer < len(recorded):
        chosen = stack[layer]
    else:
        raise ValueError(f"layer {layer!r}: give first, last, mean or a number below {len(recorded)}")
    if head == "mean":
        return chosen.mean(1)
    if isinstance(head, int) and 0 <= head < chosen.shape[1]:
        return chosen[:, head]
    raise ValueError(f"head {head!r}: give mean or a number below {chosen.shape[1]}")


def explain(
    predictor: Predictor, image: Any, question: str | None = None, text: str | None = None, method: str = "attention",
    layer: str | int = "auto", head: str | int = "mean",
) -> Explanation:
    """Heat maps of what `predictor`'s model looked at in `image` (see the module docstring): for
    a VQA model the answer to `question`; for a captioner each word of its greedy caption; for a
    retrieval model the match with `text` (method "gradient" or "gradcam")."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if predictor.task == "retrieval" and method == "attention":
        method = "gradient"  # a dual encoder's towers never attend across modalities
    model = predictor.model
    pixels = predictor.pixels([image])
    picture = from_pixels(pixels)[0]
    grid = model.vision.grid_size(predictor.image_size)
    first = int(bool(getattr(model.config.vision, "class_token", False)))  # a class token comes before the grid's tokens
    # what needs no map is computed before the attention is recorded: the caption, the text's embedding
    caption = predictor.caption(image) if predictor.task == "caption" else None
    text_emb = predictor.embed_texts(text).clone().to(pixels.device) if predictor.task == "retrieval" and text and text.strip() else None
    with torch.enable_grad(), cross_attention(model, first + grid[0] * grid[1]) as recorded:
        tokens, padding = model.vision(pixels)
        if predictor.task == "vqa":
            result, labels, scores, query = _answer(predictor, tokens, padding, question)
        elif predictor.task == "caption":
            result, labels, scores, query = _caption(predictor, tokens, padding, caption)
        else:
            if text_emb is None:
                raise ValueError("explaining a retrieval model needs a text to match the image with")
            score = model.image_embedding(tokens, padding)[0] @ text_emb
            result, labels, scores, query = {"text": text, "score": round(score.item(), 4)}, [text], [score], [0]
        if method == "attention":
            if layer == "auto":
                layer = "first" if predictor.task == "vqa" else "mean"
            weights = _pick(recorded, layer, head)[0][:, first:]  # (T, N): the grid's tokens
            maps = [_scaled(weights[t], grid) for t in query]
        else:
            maps = [token_gradient(tokens, score, grid, method, first) for score in scores]
    return Explanation(picture, result, labels, maps)


def _answer(predictor: Predictor, tokens: Tensor, padding: Tensor, question: str | None):
    """(result, labels, scores, query positions) of a VQA answer: the classifier reads [CLS]."""
    model = predictor.model
    if not question or not question.strip():
        raise ValueError("explaining a VQA model needs a question")
    if model.config.head == "generate":
        raise ValueError("explaining a generative VQA head is not supported yet; a classifier head is")
    ids, _ = predictor.tokenizer.batch([question], model.config.text.max_len, wrap="cls")
    fused, _ = model.fuse(tokens, padding, ids.to(tokens.device), first=1)
    logits = model.head(fused[:, 0])[0].float()  # (num_answers,)
    best = int(logits.argmax())
    answer = predictor.answers.answers[best]
    result = {"question": question, "answer": answer, "score": round(logits.softmax(-1)[best].item(), 4)}
    return result, [answer], [logits[best]], [0]


def _caption(predictor: Predictor, tokens: Tensor, padding: Tensor, caption: dict[str, Any]):
    """(result, labels, scores, query positions) of the model's caption, word by word: position
    t (after [BOS] and t words) writes word t + 1."""
    model = predictor.model
    ids = predictor.tokenizer.batch([caption["caption"]], model.config.max_len, wrap="bos_eos")[0].to(tokens.device)  # (1, T)
    logits = model.next_token_logits(ids[:, :-1], tokens, padding).float().log_softmax(-1)[0]  # (T - 1, V)
    words = [predictor.tokenizer.decode([i]) for i in ids[0, 1:-1].tolist()]  # [EOS] left out
    return caption, words, [logits[t, ids[0, t + 1]] for t in range(len(words))], list(range(len(words)))


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, dark blue through red to yellow."""
    stops = np.array([[0, 0, 96], [0, 96, 255], [255, 64, 0], [255, 255, 96]], dtype=np.float32)
    position = np.clip(heat, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(picture: np.ndarray, heat: np.ndarray, size: int = 224, alpha: float = 0.5) -> Image.Image:
    """The picture at `size` with the heat map (a token grid) spread over it and blended in."""
    base = Image.fromarray(picture).resize((size, size), Image.Resampling.BICUBIC)
    spread = Image.fromarray((heat * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    colours = Image.fromarray(heat_colours(np.asarray(spread, dtype=np.float32) / 255.0))
    return Image.blend(base, colours, alpha)


def render(explanation: Explanation, size: int = 224, columns: int = 4) -> Image.Image:
    """A sheet: the result on top, then one panel per map (the image with its map, its label below)."""
    rows = -(-len(explanation.maps) // columns)
    width = max(min(columns, len(explanation.maps)), 1) * size
    result = ", ".join(f"{k}: {v}" for k, v in explanation.result.items() if isinstance(v, (str, float, int)))
    lines = textwrap.wrap(result, max(20, width // 6))  # (PIL's default font: about 6 pixels a character)
    header, label_height = 8 + 12 * len(lines), 18
    sheet = Image.new("RGB", (width, header + rows * (size + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(lines):
        draw.text((4, 4 + 12 * number), line, fill="black")
    for k, (label, heat) in enumerate(zip(explanation.labels, explanation.maps)):
        x, y = (k % columns) * size, header + (k // columns) * (size + label_height)
        sheet.paste(overlay(explanation.image, heat, size), (x, y))
        draw.text((x + 4, y + size + 2), label, fill="black")
    return sheet


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(row, col) of the hottest token."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))


def on_object(heat: np.ndarray, box: tuple[float, float, float, float], image_size: int) -> bool:
    """Whether the map peaks on, or one token next to, the object in `box` (left, top, right,
    bottom, in the model's pixels): the hottest token's cell overlaps the box grown by a cell."""
    rows, cols = heat.shape
    row, col = peak(heat)
    cell_h, cell_w = image_size / rows, image_size / cols
    left, top, right, bottom = box
    return (left - cell_w < (col + 1) * cell_w and col * cell_w < right + cell_w
            and top - cell_h < (row + 1) * cell_h and row * cell_h < bottom + cell_h)
