"""Training throughput of mmt's VQA model vs Hugging Face `ViltForQuestionAnswering`.

Both are single-stream Transformers over [CLS] + question tokens + image patch tokens,
configured alike (hidden size, layers, heads, FFN size, image and text token counts,
batch size), trained on the same random batch with soft VQA targets (binary
cross-entropy) and AdamW, in one process. Each runs in its fastest precision (fp32, and
bf16 autocast where the CPU has bf16 units or on a GPU). Also prints achieved FLOP/s as a
fraction of this machine's measured fp32 and bf16 matmul peak.

    python benchmarks/vqa_vs_vilt.py [--batch 32] [--steps 5] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmt.config import TextConfig, TransformerConfig, VisionConfig
from mmt.devices import bf16_supported
from mmt.models.vqa import VQAConfig, VQAModel


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def time_training(step, steps: int, device: torch.device) -> float:
    """Seconds per step after two warm-up steps (median of `steps`), the device synchronised."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def flops_of(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image", type=int, default=96, help="image side; patches of 8 give (image/8)^2 tokens")
    parser.add_argument("--text", type=int, default=16, help="question tokens incl. [CLS] and [SEP]")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import ViltConfig, ViltForQuestionAnswering

    torch.manual_seed(0)
    D, L, H, F, P, B, T, A, V = args.hidden, args.layers, args.heads, 4 * args.hidden, 8, args.batch, args.text, 100, 1000
    patches = (args.image // P) ** 2
    layer = TransformerConfig(dim=D, depth=0, heads=H, ffn_dim=F, dropout=0.0)
    mmt_cfg = VQAConfig(
        vision=VisionConfig(stem="patch", image_size=args.image, patch_size=P, positions="learned", encoder=layer),
        text=TextConfig(vocab_size=V, max_len=T, encoder=layer),
        fusion="joint",
        fusion_encoder=TransformerConfig(dim=D, depth=L, heads=H, ffn_dim=F, dropout=0.0),
        num_answers=A,
        head_hidden=2 * D,
    )
    vilt_cfg = ViltConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
        image_size=args.image, patch_size=P, max_position_embeddings=T, num_labels=A,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    models = {"mmt": VQAModel(mmt_cfg).to(device), "vilt": ViltForQuestionAnswering(vilt_cfg).to(device)}

    pixels = torch.randn(B, 3, args.image, args.image, device=device)
    ids = torch.randint(7, V, (B, T), device=device)
    targets = torch.zeros(B, A, device=device)
    targets[torch.arange(B), torch.randint(0, A, (B,))] = 1.0

    def make_step(name, model, bf16):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if name == "mmt":
                    loss = model(pixels, ids, targets)["answer_loss"]
                else:
                    loss = model(input_ids=ids, pixel_values=pixels, labels=targets).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    precisions = [False, True] if bf16_supported(device) else [False]
    # (bf16 products without bf16 units are emulated and take minutes: measured only where used)
    peak32, peak16 = matmul_peak(torch.float32, device), matmul_peak(torch.bfloat16, device) if len(precisions) == 2 else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{where}; torch {torch.__version__}")
    print(f"tokens per sample: mmt {1 + T + patches}, vilt {T + 1 + patches}; batch {B}; hidden {D}, {L} layers, {H} heads, FFN {F}")
    print(f"measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s"
          + (f", bf16 {peak16 / 1e9:.1f} GFLOP/s" if peak16 else "  (no bf16 units on this CPU: bf16 not tried)"))
    if device.type == "cuda":
        print("(fp32 matrix products in full fp32: torch's default, TF32 off)")
    best = {}
    for name, model in models.items():
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        for bf16 in precisions:
            step = make_step(name, model, bf16)
            seconds = time_training(step, args.steps, device)
            flops = flops_of(step)
            rate = flops / seconds
            label = "bf16" if bf16 else "fp32"
            of_bf16 = f", {rate / peak16:.0%} of bf16 peak" if len(precisions) == 2 else ""
            print(f"{name:5s} {label}: {n_params / 1e6:.1f}M params, {seconds * 1000:.0f} ms/step, {B / seconds:.1f} samples/s, "
                  f"{rate / 1e9:.1f} GFLOP/s = {rate / peak32:.0%} of fp32 peak{of_bf16}")
            if B / seconds > best.get(name, (0, ""))[0]:
                best[name] = (B / seconds, label)
    ratio = best["mmt"][0] / best["vilt"][0]
    print(f"fastest: mmt {best['mmt'][0]:.1f} samples/s ({best['mmt'][1]}), vilt {best['vilt'][0]:.1f} samples/s ({best['vilt'][1]})")
    print(f"mmt / vilt training throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
