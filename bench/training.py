"""Training throughput: images per second of one full training step (discriminator + encoders/decoder), inputs
already on the device, for the published 128 px architecture at batch 32 and the slim preset, in each precision and
memory layout the trainer can take on this device.

    python -m bench.training [--device auto] [--steps 5] [--rounds 3] [--configs paper:128:32 slim:64:32] [--write]

Every row of one config is timed in the same run, the rows interleaved within every round, and each cell is the
median over the rounds, so a shared machine slows all rows alike and the ratios hold. The rows: float32 in the
default (contiguous) layout, float32 channels_last (what `did train` runs on the CPU) and bf16 autocast (what it runs
on CUDA, and on the CPU with `--precision bf16` where the CPU has native bf16).

The published code's anchor on one H100 (fp32 eager, inputs on the GPU): 45.5 ms per step of 32+32 images,
1,407 images/s."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models import checkpoint, resolve_device
from models.config import preset
from training import recipes
from training.loop import Trainer
from training.markdown import table

from .report import sync, write_section

PUBLISHED_H100_IMAGES_PER_S = 1407.0


def trainer_for(width: str, size: int, device: torch.device, precision: str, layout: torch.memory_format) -> Trainer:
    """A trainer of the published objective (the `paper` recipe's stage) with its nets in `layout`."""
    torch.manual_seed(0)
    trainer = Trainer(recipes.load("paper").stages[0].weights, preset(width, image_size=size), device,
                      precision=precision)
    trainer.memory_format = layout
    trainer.model.to(memory_format=layout)
    trainer.disc.to(memory_format=layout)
    return trainer


def rows_for(device: torch.device) -> list[tuple[str, str, torch.memory_format]]:
    """(label, precision, layout) of every row on `device`: float32 contiguous, then what `--precision auto` and
    `--precision bf16` train with there."""
    contiguous, cl = torch.contiguous_format, torch.channels_last
    if device.type == "cuda":
        return [("fp32", "float32", contiguous), ("bf16 autocast", "bf16", contiguous)]
    rows = [("fp32", "float32", contiguous), ("fp32 channels_last", "float32", cl)]
    native = checkpoint.cpu_has_bf16()
    return rows + ([("bf16 autocast channels_last", "bf16", cl)] if native else [])


def measure(trainers: dict[str, Trainer], a: torch.Tensor, b: torch.Tensor, device: torch.device, steps: int,
            rounds: int) -> dict[str, float]:
    """Median seconds per step of each trainer, the trainers interleaved within every round."""
    for t in trainers.values():  # warm-up: allocator, oneDNN primitive caches, cuDNN autotuning
        for _ in range(2):
            t.step(a, b)
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(rounds):
        for key, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                t.step(a, b)
            sync(device)
            times[key].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell is the median")
    p.add_argument("--configs", nargs="+", default=["paper:128:32", "slim:64:32"],
                   help="WIDTH:SIZE:BATCH entries (batch per domain)")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    rows = []
    for spec in args.configs:
        width, size, batch = spec.split(":")
        size_, batch_ = int(size), int(batch)
        g = torch.Generator(device="cpu").manual_seed(0)
        a = (torch.rand(batch_, 3, size_, size_, generator=g) * 2 - 1).to(device)
        b = (torch.rand(batch_, 3, size_, size_, generator=g) * 2 - 1).to(device)
        trainers = {label: trainer_for(width, size_, device, prec, layout) for label, prec, layout in rows_for(device)}
        params = sum(p.numel() for t in trainers.values() for p in [*t.model.parameters(), *t.disc.parameters()])
        params //= len(trainers)
        seconds = measure(trainers, a, b, device, args.steps, args.rounds)
        base = seconds["fp32"]
        for label, dt in seconds.items():
            ips = 2 * batch_ / dt
            vs = f"{ips / PUBLISHED_H100_IMAGES_PER_S:.2f}x" if device.type == "cuda" and spec == "paper:128:32" else "n/a"
            rows.append([width, size, f"{batch}+{batch}", f"{params / 1e6:.1f}", label, f"{dt * 1000:.1f}",
                         f"{ips:.1f}", f"{base / dt:.2f}x", vs])
            print(rows[-1], flush=True)
        del trainers
    body = table(["width", "px", "batch (a+b)", "params (M, with disc)", "precision, layout", "ms/step", "images/s",
                  "vs fp32", "vs published code on one H100 (1,407 images/s)"], rows)
    note = (f"\nInputs are already on the device; one step = discriminator update + encoder/decoder update, of the "
            f"published objective. Each cell is the median of {args.rounds} interleaved rounds of {args.steps} steps. "
            "On the CPU `did train` runs the channels_last float32 row (`--precision bf16`: the bf16 row), on CUDA the bf16 row. The ratio to the published code is "
            "only given on a GPU (its anchor was measured on one H100).\n")
    print(body)
    if args.write:
        write_section("training", "Training step throughput", body + "\n" + note)


if __name__ == "__main__":
    main()
