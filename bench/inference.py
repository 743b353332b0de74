"""Model inference throughput of a transfer with a known target (the content's common code, the guide's separate
code, one decode: what `Disentangler.transfer(content, guide, target=1)` computes), inputs already on the device,
the model made ready as the service does (`models.networks.inference_ready`: spectral norm folded into the weights;
on the CPU the layers at the 2x2 code map, and in bf16 the wide layers on small maps, as matrix products), at batch 1 (latency) and larger batches (throughput),
beside the published code's way of computing it (`bench/reference.py`: the same two encoders and decoder at the
published widths, its spectral norm's power iteration on every forward) in the same run.

    python -m bench.inference [--device auto] [--configs paper:128 slim:64] [--batches 1 16 256] [--rounds 5] [--write]

Variants: fp32; fp32 in channels_last; fp32 compiled (`models/compiled.py`: torch.compile at fixed batch shapes,
CUDA graphs on CUDA, as DID_COMPILE=compile does); bf16 (weights and activations cast, as DID_DTYPE=bfloat16 does: on
CUDA, and on CPUs with native bf16, AVX512-BF16 or AMX) and fp16 on CUDA; on the CPU also bf16 channels_last with
every layer a convolution, beside which the matrix products' gain reads. The variants run interleaved, one short
timed window each per round, and each cell is the median over the rounds, so a noisy shared machine slows all of
them alike. The published code's anchors on one H100 (fp32 eager, 128 px): 4.2 ms per transfer at batch 1 and
21,900 images/s at batch 256."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from models import compiled, resolve_device
from models.checkpoint import compute_dtype
from models.config import preset
from models.disentangler import Disentangler
from models.networks import inference_ready
from training.markdown import table

from .reference import ReferenceNets
from .report import sync, write_section

PUBLISHED_H100 = {1: 4.2, 256: 21_900.0}  # ms per transfer at batch 1; images/s at batch 256


Spec = tuple[torch.dtype, bool, bool, bool]  # dtype of weights and inputs, channels_last, compiled, matrices


def variants(device: torch.device, compile_too: bool) -> dict[str, Spec]:
    """name -> Spec. `matrices` False: every layer left a convolution (`inference_ready(..., matrices=False)`), the
    CPU's comparison for the layers `inference_ready` computes as matrix products."""
    f32, bf16 = torch.float32, torch.bfloat16
    out = {"fp32": (f32, False, False, True), "fp32 channels_last": (f32, True, False, True)}
    if compile_too:
        out["fp32 compiled"] = (f32, False, True, True)
    if compute_dtype(device, "float16")[0] == torch.float16:  # the service's own rule: CUDA only
        out["fp16"] = (torch.float16, False, False, True)
    if compute_dtype(device, "bfloat16")[0] == bf16:  # CUDA, or a CPU with native bf16
        out |= {"bf16": (bf16, False, False, True), "bf16 channels_last": (bf16, True, False, True)}
        if device.type == "cpu":
            out["bf16 channels_last, convolutions only"] = (bf16, True, False, False)
        if compile_too:
            out |= {"bf16 compiled": (bf16, False, True, True), "bf16 channels_last compiled": (bf16, True, True, True)}
    return out


def _inputs(batch: int, size: int, device: torch.device, dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tuple((torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, dtype).contiguous(memory_format=fmt)
                 for _ in range(2))


def runner(kind: str, width: str, size: int, batch: int, device: torch.device, spec: Spec) -> Callable[[], None]:
    """A function that computes one batch of transfers (`kind`: 'ours' or 'reference')."""
    dtype, channels_last, compile_it, matrices = spec
    content, guide = _inputs(batch, size, device, dtype, channels_last)
    if kind == "reference":
        ref = ReferenceNets().eval().to(device=device, dtype=dtype)
        return lambda: ref.transfer(content, guide)
    model = inference_ready(Disentangler(preset(width, image_size=size)).eval().to(device=device, dtype=dtype), matrices)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_it:
        compiled.prepare(model, "compile", batch)
        compiled.warm(model)
    return lambda: model.transfer(content, guide, target=1)


def timed(fn: Callable[[], None], device: torch.device, seconds: float) -> float:
    """Seconds per call over a window of about `seconds` (at least 2 calls)."""
    runs, t0 = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        if runs >= 2:
            sync(device)
            if time.perf_counter() - t0 >= seconds:
                return (time.perf_counter() - t0) / runs


@torch.inference_mode()
def measure(cells: dict[tuple, Callable[[], None]], device: torch.device, rounds: int, seconds: float) -> dict[tuple, float]:
    """Median seconds per call of each cell, the cells interleaved within every round."""
    for fn in cells.values():  # warm-up
        fn()
        fn()
    sync(device)
    times: dict[tuple, list[float]] = {k: [] for k in cells}
    for _ in range(rounds):
        for key, fn in cells.items():
            times[key].append(timed(fn, device, seconds))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--configs", nargs="+", default=["paper:128", "slim:64"], help="WIDTH:SIZE entries")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each cell is the median")
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per cell and round")
    p.add_argument("--compile", action="store_true", help="add the compiled variants (each compiles its shapes first)")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    specs = variants(device, args.compile)
    rows = []
    for entry in args.configs:
        width, size = entry.split(":")
        paper = width == "paper" and int(size) == 128
        for batch in args.batches:
            cells = {("ours", name): runner("ours", width, int(size), batch, device, spec) for name, spec in specs.items()}
            if paper:
                cells[("reference", "fp32")] = runner("reference", width, int(size), batch, device, specs["fp32"])
            t = measure(cells, device, args.rounds, args.seconds)
            ref = t.get(("reference", "fp32"))
            for (kind, name), s in t.items():
                anchor = "n/a"
                if device.type == "cuda" and paper and batch in PUBLISHED_H100:
                    anchor = f"{PUBLISHED_H100[1] / (s * 1000):.2f}x" if batch == 1 else f"{batch / s / PUBLISHED_H100[256]:.2f}x"
                label = "published code's way (bench/reference.py)" if kind == "reference" else "Disentangler.transfer"
                rows.append([width, size, label, name, batch, f"{s * 1000:.2f}", f"{batch / s:,.0f}",
                             f"{ref / s:.2f}x" if ref else "n/a", anchor])
                print(rows[-1], flush=True)
    body = table(["width", "px", "computed by", "precision", "batch", "ms/batch", "images/s", "vs the published code's way",
                  "vs published code on one H100 (4.2 ms at batch 1, 21,900 images/s at 256)"], rows)
    print(body)
    if args.write:
        write_section("inference", "Transfer inference throughput", body + (
            f"\n\nInputs already on the device; one transfer with a known target = the content's common code, the "
            f"guide's separate code, one decode. Each cell is the median of {args.rounds} interleaved rounds of "
            f"{args.seconds} s.\n"))


if __name__ == "__main__":
    main()
