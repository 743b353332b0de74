"""Model inference throughput: one transfer (both encoders of content and guide, then the decoder) per image,
inputs already on the device, spectral norm folded into the weights as the service does, at batch 1 (latency) and at a large batch (throughput).

    python -m bench.inference [--device auto] [--configs paper:128 slim:128] [--batches 1 256]

The published code's anchors on one H100 (fp32 eager, 128 px): 4.2 ms per transfer at batch 1 and 21,900
images/s at batch 256. Precisions: fp32, and on CUDA also fp16 and bf16 (weights and activations cast, as the
service's DID_DTYPE does)."""
from __future__ import annotations

import argparse
import time

import torch

from models import resolve_device
from models.config import preset
from models.disentangler import Disentangler
from models.networks import bake_spectral_norm
from training.markdown import table

from .report import sync, write_section

PUBLISHED_H100 = {1: 4.2, 256: 21_900.0}  # ms per transfer at batch 1; images/s at batch 256



@torch.no_grad()
def measure(width: str, size: int, batch: int, dtype: torch.dtype, device: torch.device, seconds: float) -> dict[str, float]:
    model = bake_spectral_norm(Disentangler(preset(width, image_size=size)).eval()).to(device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    content = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    guide = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    for _ in range(3):
        model.transfer(content, guide, target=1)
    sync(device)
    runs, t0 = 0, time.perf_counter()
    while True:
        model.transfer(content, guide, target=1)
        runs += 1
        if runs % 5 == 0:
            sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    dt = (time.perf_counter() - t0) / runs
    return {"ms_per_batch": dt * 1000, "images_per_s": batch / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--configs", nargs="+", default=["paper:128", "slim:128", "slim:64"], help="WIDTH:SIZE entries")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    args = p.parse_args()
    device = resolve_device(args.device)
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes |= {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for spec in args.configs:
        width, size = spec.split(":")
        for name, dtype in dtypes.items():
            for batch in args.batches:
                r = measure(width, int(size), batch, dtype, device, args.seconds)
                anchor = "n/a"
                if device.type == "cuda" and spec == "paper:128" and batch in PUBLISHED_H100:
                    anchor = (f"{PUBLISHED_H100[1] / r['ms_per_batch']:.2f}x" if batch == 1
                              else f"{r['images_per_s'] / PUBLISHED_H100[256]:.2f}x")
                rows.append([width, size, name, batch, f"{r['ms_per_batch']:.2f}", f"{r['images_per_s']:,.0f}", anchor])
                print(rows[-1], flush=True)
    body = table(["width", "px", "precision", "batch", "ms/batch", "images/s",
                  "vs published code on one H100 (4.2 ms at batch 1, 21,900 images/s at 256)"], rows)
    print(body)
    write_section("inference", "Transfer inference throughput", body + "\n\nInputs already on the device; "
                  "one transfer = content and guide through the three encoders, then the decoder.\n")


if __name__ == "__main__":
    main()
