"""Synthetic face renderer throughput: images per second of `training.synthetic` at each image size.

    python -m bench.renderer [--sizes 64 128 256] [--batch 64] [--seconds 5] [--device auto|cpu|cuda] [--write]

Three timings per size: `sample + render` (fresh face indices every batch: what the training stream does per
render call), `render` alone and `render + masks` (images and the three attribute masks, what the evaluation
draws), both over eight batches of faces sampled beforehand, in turn. Each is the median batch time over
`--seconds` of batches after two warm-up batches, reported as images per second. On CUDA the device is
synchronised around every timed batch."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from models import resolve_device
from training.synthetic import render, render_with_masks, sample_faces
from training.markdown import table

from .report import sync, write_section



def _median_seconds(fn: Callable[[int], object], device: torch.device, seconds: float) -> float:
    """Median wall time of fn(i) for i = 0, 1, ... over `seconds`, after two warm-up calls."""
    fn(-1)
    fn(-2)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(times) < 5:
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def measure(size: int, batch: int, device: torch.device, seconds: float) -> dict[str, float]:
    def indices(i: int) -> torch.Tensor:
        return torch.arange(batch, device=device) + (i + 10) * batch

    faces = [sample_faces(indices(i), device=device) for i in range(8)]
    t_sample_render = _median_seconds(lambda i: render(sample_faces(indices(i), device=device), size), device, seconds)
    t_render = _median_seconds(lambda i: render(faces[i % 8], size), device, seconds)
    t_masks = _median_seconds(lambda i: render_with_masks(faces[i % 8], size), device, seconds)
    return {
        "sample_render": batch / t_sample_render,
        "render": batch / t_render,
        "render_masks": batch / t_masks,
        "ms_render": t_render * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    rows = []
    for size in args.sizes:
        r = measure(size, args.batch, device, args.seconds)
        rows.append([f"{size} px", args.batch, f"{r['ms_render']:.1f}", f"{r['render']:,.0f}",
                     f"{r['render_masks']:,.0f}", f"{r['sample_render']:,.0f}"])
        print(f"{size} px: render {r['render']:,.0f} img/s, render+masks {r['render_masks']:,.0f} img/s, "
              f"sample+render {r['sample_render']:,.0f} img/s", flush=True)
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    headers = ["size", "batch", "ms / batch (render)", "render img/s", "render + masks img/s", "sample + render img/s"]
    body = (table(headers, rows)
            + f"\n\nDevice: {device.type}{threads}. Median batch time over {args.seconds:g} s per cell; `sample + render` "
              "draws fresh face indices every batch, as `SyntheticPairs.batches` does per render call.")
    print(body)
    if args.write:
        write_section("renderer", "Synthetic face renderer throughput", body)


if __name__ == "__main__":
    main()
