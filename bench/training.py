"""Training throughput: images per second of one full training step (discriminator + encoders/decoder), inputs
already on the device, for the published 128 px architecture at batch 32 and the slim preset.

    python -m bench.training [--device auto] [--steps 20] [--configs paper:128:32 slim:128:32] [--precision both] [--write]

The published code's anchor on one H100 (fp32 eager, inputs on the GPU): 45.5 ms per step of 32+32 images,
1,407 images/s."""
from __future__ import annotations

import argparse
import time

import torch

from models import resolve_device
from models.config import preset
from training import recipes
from training.loop import Trainer
from training.markdown import table

from .report import sync, write_section

PUBLISHED_H100_IMAGES_PER_S = 1407.0



def measure(width: str, size: int, batch: int, device: torch.device, steps: int, amp: bool) -> dict[str, float]:
    # the published objective (the `paper` recipe's stage)
    trainer = Trainer(recipes.load("paper").stages[0].weights, preset(width, image_size=size), device, amp=amp)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    b = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    for _ in range(max(2, steps // 5)):  # warm-up: allocator, cuDNN autotuning
        trainer.step(a, b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(a, b)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in trainer.model.parameters()) + sum(p.numel() for p in trainer.disc.parameters())
    return {"ms_per_step": dt * 1000, "images_per_s": 2 * batch / dt, "params_m": params / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--configs", nargs="+", default=["paper:128:32", "slim:128:32", "slim:64:32"],
                   help="WIDTH:SIZE:BATCH entries (batch per domain)")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both",
                   help="on CUDA: fp32, bf16 autocast (what training uses) or both (default); the CPU runs fp32")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    amps = [False] if device.type != "cuda" else {"both": [False, True], "fp32": [False], "bf16": [True]}[args.precision]
    rows = []
    for spec in args.configs:
        width, size, batch = spec.split(":")
        for amp in amps:
            r = measure(width, int(size), int(batch), device, args.steps, amp)
            vs = f"{r['images_per_s'] / PUBLISHED_H100_IMAGES_PER_S:.2f}x" if device.type == "cuda" and spec == "paper:128:32" else "n/a"
            rows.append([width, size, f"{batch}+{batch}", f"{r['params_m']:.1f}", "bf16 autocast" if amp else "fp32",
                         f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.1f}", vs])
            print(rows[-1], flush=True)
    body = table(["width", "px", "batch (a+b)", "params (M, with disc)", "precision", "ms/step", "images/s",
                  "vs published code on one H100 (1,407 images/s)"], rows)
    note = ("\nInputs are already on the device; one step = discriminator update + encoder/decoder update. The ratio "
            "to the published code is only given on a GPU (its anchor was measured on one H100).\n")
    print(body)
    if args.write:
        write_section("training", "Training step throughput", body + "\n" + note)


if __name__ == "__main__":
    main()
