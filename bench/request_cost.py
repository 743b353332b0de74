"""What one POST /transfer costs the service, stage by stage, each measured alone in one thread (the share of one
worker of the two-worker layout on a 2-core machine): the two uploads' decode and fit to the model's square, the
model's work for the request inside a batch (through the service's own `app.batcher.Batcher`, with and without the
out-of-domain check), and the answer's PNG encode. Their sum is the least CPU a request can cost; bench/http_load.py
measures what the running service spends, and the difference is the HTTP, multipart, asyncio and thread hand-offs
around them.

    python -m bench.request_cost [--weights weights/beard_glasses] [--batch 16] [--rounds 5] [--write]

The uploads are the HTTP benchmark's (`bench.http_load.face_pngs`: 128 px synthetic faces as PNG); the model is a
slim 64 px checkpoint, as there. Each cell is the median of interleaved rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

import models
from app import imaging
from app.batcher import Batcher
from app.routes.edit import TransferPlan
from models.images import fit, to_pil, to_tensor
from models.networks import inference_ready
from training.markdown import table

from .http_load import face_pngs
from .report import write_section

ROOT = Path(__file__).resolve().parent.parent


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of `fn` over about `seconds` (at least 3 calls)."""
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        fn()
        runs += 1
    return (time.perf_counter() - t0) / runs


def model_cells(model: models.Disentangler, size: int, batch: int) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """A batch of `batch` transfer requests (content + guide, the guide's domain detected) through one Batcher, as
    the route submits them (its `TransferPlan`), with and without the out-of-domain check (`score`); and the function that stops it."""
    loop = asyncio.new_event_loop()
    batcher = Batcher("bench", model, max_batch=2 * batch, max_wait_ms=5.0, queue_size=4 * batch)

    async def start() -> None:  # the batcher's worker task needs the running loop
        batcher.start()

    loop.run_until_complete(start())
    g = torch.Generator().manual_seed(0)
    pairs = [torch.rand(2, 3, size, size, generator=g) * 2 - 1 for _ in range(batch)]
    parts = model.transfer_parts(None, False)
    plan = TransferPlan(1, None, 1.0, False)  # the route's: the guide's domain detected, its code onto the content

    def run(score: bool) -> Callable[[], object]:
        async def requests() -> list:
            return await asyncio.gather(*(batcher.render(x, plan, parts, score=score) for x in pairs))
        return lambda: loop.run_until_complete(requests())

    def close() -> None:
        loop.run_until_complete(batcher.stop())
        loop.close()

    return {"model, out-of-domain check on (DID_DOMAIN_CHECK=true, the default)": run(True),
            "model, out-of-domain check off": run(False)}, close


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / "beard_glasses", help="a slim 64 px checkpoint")
    p.add_argument("--batch", type=int, default=16, help="requests per model call (two images each)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per cell and round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one worker's share of two cores)")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = inference_ready(models.load(args.weights, device="cpu")).to(memory_format=torch.channels_last)
    size = model.config.image_size
    content, _ = face_pngs()
    upright = imaging.decode_rgb(content, "content")
    placed = fit(upright, size)
    x = to_tensor(placed)
    answer = to_pil(x)
    # (stage, per: how many per request, fn)
    cells: dict[str, tuple[int, Callable[[], object]]] = {
        f"upload decode ({upright.width} px PNG, {len(content):,} bytes)": (2, lambda: imaging.decode_rgb(content, "content")),
        f"fit {upright.width} -> {size} px (`models.images.fit`: a whole-factor reduce)": (2, lambda: fit(upright, size)),
        "for comparison: the same resize bicubic": (0, lambda: upright.resize((size, size), Image.Resampling.BICUBIC)),
        "to tensor": (2, lambda: to_tensor(placed)),
        "answer to image (`to_pil`)": (1, lambda: to_pil(x)),
    }
    for level in (0, 1, 3):
        default = " (DID_PNG_LEVEL default)" if level == 3 else ""
        cells[f"PNG encode, level {level}{default}"] = (1 if level == 3 else 0, lambda level=level: imaging._save(answer, "png", level))
    batched, close = model_cells(model, size, args.batch)
    cells |= {name: (1, fn) for name, fn in batched.items()}

    times: dict[str, list[float]] = {k: [] for k in cells}
    with torch.inference_mode():
        for _, fn in cells.values():
            fn()
        for _ in range(args.rounds):
            for name, (_, fn) in cells.items():
                times[name].append(per_call(fn, args.seconds))
    close()
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, total = [], {True: 0.0, False: 0.0}
    for name, (per, _) in cells.items():
        batch_cell = name.startswith("model")
        each = med[name] / args.batch if batch_cell else med[name]
        per_request = each * per
        rows.append([name, f"{each * 1e3:.3f}" + (f" (batch of {args.batch} requests: {med[name] * 1e3:.2f})" if batch_cell else ""),
                     per if per else "-", f"{per_request * 1e3:.3f}" if per else "-"])
        if per and not batch_cell:
            total[True] += per_request
            total[False] += per_request
        elif batch_cell:
            total["check on" in name] += per_request
    rows.append(["**least CPU per request, check on**", "", "", f"**{total[True] * 1e3:.2f}**"])
    rows.append(["**least CPU per request, check off**", "", "", f"**{total[False] * 1e3:.2f}**"])
    body = table(["stage", "ms each", "per request", "ms per request"], rows)
    print(body)
    if args.write:
        write_section("request-cost", "What a request costs", body + (
            f"\n\nOne thread (torch threads {args.threads}); each cell is the median of {args.rounds} interleaved rounds of "
            f"{args.seconds} s. The model rows are {args.batch} transfer requests (content + guide, the guide's domain "
            f"detected) through one `app.batcher.Batcher` call, divided by {args.batch}; the checkpoint "
            f"{args.weights.name} in float32 channels_last, as `inference_ready` prepares it. The sums leave out what "
            "the service spends around these stages: HTTP, multipart parsing, asyncio and the thread hand-offs.\n"))


if __name__ == "__main__":
    main()
