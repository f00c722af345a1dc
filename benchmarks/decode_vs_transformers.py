"""Decoding throughput of mmt's captioner vs Hugging Face `VisionEncoderDecoderModel` (ViT + GPT-2).

Both are an image Transformer encoder over 8x8 patches plus a Transformer decoder with
masked self-attention and cross-attention to the image tokens, configured alike (width,
heads, FFN size, encoder and decoder depth, image and patch size, vocabulary, maximum
positions; GELU everywhere, dropout off), randomly initialised, in eval mode under
`torch.inference_mode()`, one process, the same random images, the same dtype (fp32 by
default, `--dtype bf16`: both models' weights in bf16) and device (`--device cuda`).

Same work on both sides:
- exactly `--new-tokens` tokens after the start token: mmt's [EOS] is set to -1 (never
  produced) and Hugging Face's `eos_token_id` to None, so no sequence stops early; the
  output lengths are checked on both sides;
- the image is encoded once per `generate` call (timed: it is part of captioning), both
  decoders reuse their KV cache for self-attention and project the image keys/values once;
- greedy, and beam search with `--beams` beams, length penalty 1, one returned sequence;
- Hugging Face runs with its defaults (SDPA attention, no repetition penalty, no n-gram
  blocking, no sampling: its generation config is printed), `decoder_start_token_id` =
  `bos_token_id` = 5 ([BOS]), `pad_token_id` = 0. mmt also masks [PAD] and [BOS] out of
  the next-token distribution (two logits).
On a GPU mmt replays each decoder step as a recorded CUDA graph (its default there); the
table also gives mmt with that turned off (`cuda_graph=False`, "eager"); on a CPU mmt decodes
through gathered views of its modules (`mmt/gathered.py`). Each timed call ends with the
device synchronised.
tokens/s = batch x new tokens / seconds per `generate` call (beam search counts the
returned sequence, not every beam). Repetitions of the models alternate and the median is
reported; GFLOP per call are counted with torch's FlopCounterMode (mmt's in its eager
mode: a replayed graph runs no operator the counter could see).

    python benchmarks/decode_vs_transformers.py [--vocab 100 30000] [--batches 1 32] [--reps 7] [--threads 1]
    python benchmarks/decode_vs_transformers.py --device cuda [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmt.config import TransformerConfig, VisionConfig
from mmt.devices import bf16_supported
from mmt.models.caption import CaptionConfig, CaptionModel

PAD, BOS = 0, 5
GOALS = {"greedy": 3.0, "beam": 5.0}  # tracked: mmt / transformers tokens/s (greedy at batch 1; beam search)


def build_models(args, vocab: int) -> tuple[CaptionModel, torch.nn.Module]:
    """mmt's captioner and a ViT + GPT-2 VisionEncoderDecoderModel of the same sizes, in eval mode."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    D, H, F = args.hidden, args.heads, args.ffn
    layer = TransformerConfig(dim=D, depth=args.vision_layers, heads=H, ffn_dim=F, dropout=0.0)
    mmt = CaptionModel(CaptionConfig(
        vision=VisionConfig(stem="patch", image_size=args.image, patch_size=args.patch, encoder=layer),
        decoder=TransformerConfig(dim=D, depth=args.decoder_layers, heads=H, ffn_dim=F, dropout=0.0),
        vocab_size=vocab, max_len=args.max_len, pad_id=PAD, bos_id=BOS, eos_id=-1,  # -1: never generated
    ))
    vit = ViTConfig(
        hidden_size=D, num_hidden_layers=args.vision_layers, num_attention_heads=H, intermediate_size=F,
        image_size=args.image, patch_size=args.patch, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    gpt2 = GPT2Config(
        vocab_size=vocab, n_positions=args.max_len, n_embd=D, n_layer=args.decoder_layers, n_head=H, n_inner=F,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD,
    )
    # no pooler: VisionEncoderDecoderModel never reads the pooled [CLS], so it would only add work
    hf = VisionEncoderDecoderModel(encoder=ViTModel(vit, add_pooling_layer=False), decoder=GPT2LMHeadModel(gpt2))
    hf.config.decoder_start_token_id, hf.config.pad_token_id, hf.config.eos_token_id = BOS, PAD, None
    hf.generation_config = GenerationConfig(
        decoder_start_token_id=BOS, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None,
        do_sample=False, use_cache=True,
    )
    return mmt.eval(), hf.eval()


def param_groups(name: str, model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by role; tied weights count once (as `parameters()` does)."""
    if name == "mmt":
        prefixes = {
            "image encoder": ("vision.",), "token+position emb.": ("embed.",),
            "decoder layers": ("decoder.",), "output head": ("lm_head.",),
        }
    else:
        prefixes = {
            "image encoder": ("encoder.",), "token+position emb.": ("decoder.transformer.wte.", "decoder.transformer.wpe."),
            "decoder layers": ("decoder.transformer.h.", "decoder.transformer.ln_f."), "output head": ("decoder.lm_head.",),
        }
    counts = dict.fromkeys(prefixes, 0)
    for param_name, param in model.named_parameters():
        group = next(g for g, p in prefixes.items() if param_name.startswith(p))
        counts[group] += param.numel()
    return counts


def make_call(name: str, model: torch.nn.Module, pixels: torch.Tensor, new_tokens: int, beams: int):
    """A no-argument function that captions `pixels` and returns ids (B, 1 + new_tokens), [BOS] first,
    once the device has finished."""
    sync = torch.cuda.synchronize if pixels.is_cuda else (lambda: None)
    if name.startswith("mmt"):  # "mmt eager": without CUDA graphs
        run = lambda: model.generate(pixels, max_new_tokens=new_tokens, num_beams=beams, cuda_graph=name == "mmt").ids[:, 0]
    else:
        run = lambda: model.generate(pixel_values=pixels, max_new_tokens=new_tokens, num_beams=beams, do_sample=False)

    def call():
        ids = run()
        sync()
        return ids

    return call


def check_lengths(name: str, ids: torch.Tensor, batch: int, new_tokens: int) -> None:
    """Both sides must do the same work: every sequence exactly `new_tokens` long after [BOS]."""
    if ids.shape != (batch, 1 + new_tokens) or (ids[:, 0] != BOS).any():
        raise RuntimeError(f"{name} generated ids of shape {tuple(ids.shape)}, expected ({batch}, {1 + new_tokens}) from [BOS]")
    if name.startswith("mmt") and (ids == PAD).any():  # mmt pads a sequence after its [EOS]
        raise RuntimeError("mmt padded a sequence: it stopped before the length limit")


def median_seconds(calls: dict, reps: int) -> dict[str, float]:
    """Median seconds per call; the models alternate and take turns going first, so that
    load from other work on the machine falls on both alike."""
    seconds = {name: [] for name in calls}
    for rep in range(reps):
        for name in list(calls) if rep % 2 == 0 else list(calls)[::-1]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def flops_of(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[100, 30000], help="vocabulary sizes, one table block each")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--decoder-layers", type=int, default=3)
    parser.add_argument("--image", type=int, default=64, help="image side; patches of --patch give (image/patch)^2 tokens")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32, help="decoder positions (both models)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both models' weights and activations")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per model and case (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (0: torch's default). 1 by default: on this shared 2-core machine two threads made "
        "decoding times swing several-fold between repetitions",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_len < args.new_tokens + 1:
        parser.error(f"--max-len {args.max_len} must leave room for [BOS] + {args.new_tokens} tokens")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    torch.manual_seed(0)
    patches, N = (args.image // args.patch) ** 2, args.new_tokens
    print(f"hidden {args.hidden}, {args.heads} heads, FFN {args.ffn}; image encoder {args.vision_layers} layers over "
          f"{args.image}x{args.image} images in {args.patch}x{args.patch} patches "
          f"(mmt {patches} tokens, transformers {patches} + [CLS]); decoder {args.decoder_layers} layers, "
          f"{args.max_len} positions; {N} new tokens, beam width {args.beams}")
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    if cuda:
        where = f"{torch.cuda.get_device_name(device)} (mmt replays CUDA graphs; 'eager' columns: without)"
    else:
        no_bf16 = "" if bf16_supported(device) else " (no AVX512-BF16/AMX units: bf16 is emulated)"
        where = f"{cpu_name()}{no_bf16}, {torch.get_num_threads()} torch thread(s)"
    print(f"{args.dtype} on {where}; torch {torch.__version__}; median of {args.reps} alternating calls each")

    header = (f"{'mode':8s}{'batch':>6s}{'mmt tok/s':>11s}{'hf tok/s':>10s}{'mmt/hf':>8s}{'goal':>6s}"
              f"{'mmt ms':>9s}{'hf ms':>9s}{'mmt GFLOP':>11s}{'hf GFLOP':>10s}")
    if cuda:
        header += f"{'eager tok/s':>13s}{'eager/hf':>10s}"
    with torch.inference_mode():
        for vocab in args.vocab:
            models = dict(zip(("mmt", "hf"), (m.to(device, dtype) for m in build_models(args, vocab))))
            if cuda:
                models["mmt eager"] = models["mmt"]
            print(f"\nvocabulary {vocab}")
            if vocab == args.vocab[0]:
                hf_settings = models["hf"].generation_config.to_diff_dict()
                print(f"  transformers generation config (non-defaults; eos_token_id None): {hf_settings}")
            groups = {name: param_groups(name, models[name]) for name in ("mmt", "hf")}
            for group in groups["mmt"]:
                print(f"  {group:20s} mmt {groups['mmt'][group]:>10,d}   transformers {groups['hf'][group]:>10,d}")
            print(f"  {'total':20s} mmt {sum(groups['mmt'].values()):>10,d}   transformers {sum(groups['hf'].values()):>10,d}")
            print(f"  (GPT-2 ties its output head to the token embedding, mmt's has its own {vocab}x{args.hidden} + bias; "
                  f"ViT learns a [CLS] and {patches + 1} positions, mmt a row and a column table: "
                  f"{2 * int(patches ** 0.5)} x {args.hidden})")
            print(header)
            notes = []
            for beams in (1, args.beams):
                for B in args.batches:
                    pixels = torch.randn(B, 3, args.image, args.image).to(device, dtype)
                    calls = {name: make_call(name, model, pixels, N, beams) for name, model in models.items()}
                    outputs = {}
                    for name, call in calls.items():  # warm-up (graphs are recorded here) and the length check
                        outputs[name] = call()
                        check_lengths(name, outputs[name], B, N)
                    if cuda:  # the graph runs the slot cache (masked attention over all slots): same
                        # tokens unless a rounding difference flips a near-tie of the random model
                        same = (outputs["mmt"] == outputs["mmt eager"]).float().mean().item()
                        notes.append(f"{'greedy' if beams == 1 else f'beam{beams}'} batch {B}: "
                                     f"{same:.1%} of tokens equal with and without the CUDA graph")
                    flops = {name: flops_of(calls[name if name == "hf" or not cuda else "mmt eager"]) for name in ("mmt", "hf")}
                    seconds = median_seconds(calls, args.reps)
                    rate = {name: B * N / seconds[name] for name in calls}
                    goal = "" if beams == 1 and B > 1 else f"{GOALS['greedy' if beams == 1 else 'beam']:.0f}x"
                    print(f"{'greedy' if beams == 1 else f'beam{beams}':8s}{B:>6d}{rate['mmt']:>11.0f}{rate['hf']:>10.0f}"
                          f"{rate['mmt'] / rate['hf']:>7.2f}x{goal:>6s}{seconds['mmt'] * 1000:>9.1f}{seconds['hf'] * 1000:>9.1f}"
                          f"{flops['mmt'] / 1e9:>11.2f}{flops['hf'] / 1e9:>10.2f}"
                          + (f"{rate['mmt eager']:>13.0f}{rate['mmt eager'] / rate['hf']:>9.2f}x" if cuda else ""))
            for note in notes:
                print(f"  {note}")
    print("\ngoal: mmt >= 3x transformers tokens/s for greedy at batch 1, >= 5x for beam search")


if __name__ == "__main__":
    main()
