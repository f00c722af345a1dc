"""How fast a text-to-image run draws: seconds per image at batch 1 and images per second at
batch 32, with classifier-free guidance (the run's default: twice the rows) and without, and
the key/value cache against recomputing the prefix (the ratio says what the cache buys).

Each setting draws from the same sentences (the suite's seen prompts, in turn) with sampling
seeds; the first call of each setting is a warm-up, then `--reps` calls are timed and the
median is reported. One process, `torch.inference_mode()`, the threads torch chooses (or
`--threads`). Timed: the text encoder, the 64 decoding steps and the VQ-VAE decoder, i.e.
`T2IModel.generate`, as `mmt generate` and `Predictor.generate_images` call it.

    python benchmarks/t2i_speed.py runs/t2i [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mmt import checkpoint
from mmt.data.worlds.shapes_t2i import prompt_suite


def seconds_per_call(model, ids: torch.Tensor, reps: int, **options) -> float:
    model.generate(ids, do_sample=True, seed=0, **options)  # warm-up
    times = []
    for rep in range(reps):
        started = time.perf_counter()
        model.generate(ids, do_sample=True, seed=rep + 1, **options)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, directory = checkpoint.load_for_inference(args.run_dir)
    texts = [p.text for p in prompt_suite()[0]]
    print(f"{directory}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (the tokenizer's included); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| batch | guidance | cache | s per call | images/s |")
    print("|---|---|---|---|---|")
    timings = {}
    with torch.inference_mode():
        for batch in (1, 32):
            ids, _ = tokenizer.batch([texts[k % len(texts)] for k in range(batch)], model.config.text.max_len)
            for guidance in (3.0, 1.0):
                for cache in (True, False):
                    seconds = seconds_per_call(model, ids, args.reps, guidance_scale=guidance, use_cache=cache, gathered=cache)
                    timings[batch, guidance, cache] = seconds
                    print(f"| {batch} | {guidance:g} | {'yes' if cache else 'no'} | {seconds:.3f} | {batch / seconds:.1f} |", flush=True)
    for batch in (1, 32):
        for guidance in (3.0, 1.0):
            ratio = timings[batch, guidance, False] / timings[batch, guidance, True]
            print(f"batch {batch}, guidance {guidance:g}: the cache draws {ratio:.2f}x as fast as recomputing the prefix")


if __name__ == "__main__":
    main()
