"""Where a mask model's masks open: a quick diagnosis on a few test faces, beside the full `did eval`.

    python -m training.mask_probe CHECKPOINT [--n 32] [--out probe.png]

Per domain it prints the mean mask inside and outside the renderer's exact attribute region, and what the judge
sees on the attribute-free decode G(E_c(x), 0, 0). That last number tells the failure that IoU alone hides: when
the attribute-free decode draws the attribute itself, the mask has nothing to add and closes on it. It also prints
the IoU that the renderer's own set of changed pixels (coverage > 0) scores against the true region (coverage >
0.5): the share of anti-aliased edge pixels at this size, which bounds what a mask that opens wherever the
attribute touches a pixel can reach; and, at the 0.5 threshold, the region's pixels the mask misses and the pixels
it adds outside (both as fractions of the region's area). `--out` writes a grid, per domain: inputs, predicted masks, true regions,
removals (first 8 faces).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.disentangler import Disentangler
from models.images import save_grid

from . import judge as judge_mod
from . import metrics
from . import synthetic
from .evaluate import synthetic_pair


@torch.no_grad()
def probe(model: Disentangler, judge: judge_mod.Judge, n: int = 32,
          seed: int = synthetic.TEST_SEED) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
    """Per domain: mean mask inside / outside the true region and the judge's rates on G(E_c(x), 0, 0); and the
    picture rows (in [-1, 1])."""
    if model.config.variant != "mask":
        raise ValueError(f"a {model.config.variant} model has no masks to probe")
    pair = synthetic_pair(model)
    model.eval()
    report: dict[str, dict[str, Any]] = {}
    rows = []
    for dom, attr in (("a", model.config.domain_a), ("b", model.config.domain_b)):
        faces = synthetic.sample_domain(pair, dom, range(n), seed=seed)
        x, masks = synthetic.render_with_masks(faces, model.config.image_size)
        x = x.to(model.device)
        coverage = masks[attr].to(model.device)
        truth = (coverage > 0.5).float()
        seg, removed = model.segment(x, dom), model.remove(x, dom)
        base = model.decode(model.encode(x).common)
        seen = judge.to(model.device).eval().predict(base)
        area = max(truth.sum().item(), 1)
        report[attr] = {
            "mask_inside": round((seg * truth).sum().item() / area, 4),
            "mask_outside": round(((seg * (1 - truth)).sum() / (1 - truth).sum().clamp(min=1)).item(), 4),
            "judge_on_attribute_free_decode": {name: round(v.float().mean().item(), 4) for name, v in seen.items()},
            "changed_pixels_iou": round(metrics.iou(coverage > 0, truth > 0).mean().item(), 4),
            # where the mask at 0.5 errs, as fractions of the true regions' area: too small, or too large
            "missed_at_0.5": round(((seg <= 0.5) & (truth > 0)).sum().item() / area, 4),
            "extra_at_0.5": round(((seg > 0.5) & (truth == 0)).sum().item() / area, 4),
        }
        k = min(8, n)
        rows += [x[:k], seg[:k].expand(-1, 3, -1, -1) * 2 - 1, truth[:k].expand(-1, 3, -1, -1) * 2 - 1, removed[:k]]
    return report, torch.cat(rows).cpu()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.mask_probe", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--judge", type=Path, default=Path("weights/judge/judge"))
    ap.add_argument("--n", type=int, default=32, help="test faces per domain (seed 7919)")
    ap.add_argument("--out", type=Path, help="write the picture here (PNG)")
    args = ap.parse_args(argv)
    model = checkpoint.load(args.checkpoint, device="cpu")
    report, picture = probe(model, judge_mod.load(args.judge, "cpu"), n=args.n)
    for attr, r in report.items():
        print(f"{attr}: mask inside {r['mask_inside']:.3f} outside {r['mask_outside']:.3f}; "
              f"judge on G(E_c(x), 0, 0): {r['judge_on_attribute_free_decode']}; "
              f"IoU of the changed pixels against the region: {r['changed_pixels_iou']:.3f}; at 0.5 the mask misses "
              f"{r['missed_at_0.5']:.1%} of the region and adds {r['extra_at_0.5']:.1%} of its area outside")
    if args.out:
        print(f"wrote {save_grid(picture, args.out, nrow=min(8, args.n))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
