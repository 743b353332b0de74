"""The papers' figures as image tensors: transfer grids (guides down the side, contents across the top, like
Figure 2 of Benaim et al.), removal rows and interpolation strips; for digit models, domain-adaptation grids
(source digits down the side, style guides across the top). Used for training samples and evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from models.disentangler import Disentangler
from models.images import grid, save_grid


@torch.no_grad()
def transfer_grid(model: Disentangler, contents: torch.Tensor, guides: torch.Tensor, target: int) -> torch.Tensor:
    """(3, H, W) grid: top row the contents, left column the guides, cell (i, j) = content j with guide i's
    attribute of domain `target` (0 = a, 1 = b), the content's other attribute removed."""
    nc, ng = contents.shape[0], guides.shape[0]
    content = contents.repeat(ng, 1, 1, 1)  # (ng*nc, ...) row-major: guide i, content j
    guide = guides.repeat_interleave(nc, dim=0)
    edits = model.transfer(content, guide, target=target).view(ng, nc, *contents.shape[1:])
    blank = torch.ones_like(contents[:1])
    rows = [torch.cat([blank, contents])] + [torch.cat([guides[i : i + 1], edits[i]]) for i in range(ng)]
    return grid(torch.cat(rows).float().cpu(), nrow=nc + 1)


@torch.no_grad()
def removal_rows(model: Disentangler, images: torch.Tensor) -> torch.Tensor:
    """(3, H, W): the inputs, their reconstructions, and the removal of a's, b's and both attributes, one row each;
    for a mask model also a row of each image's attribute mask (white = attribute) by its detected domain."""
    rows = [images, model.reconstruct(images), model.remove(images, "a"), model.remove(images, "b"), model.remove(images, "both")]
    if model.config.has_mask:
        rows.append((model.segment(images) * 2 - 1).expand(-1, 3, -1, -1))
    return grid(torch.cat(rows).float().cpu(), nrow=images.shape[0])


@torch.no_grad()
def interpolation_strips(model: Disentangler, start: torch.Tensor, end: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """(3, H, W): for each code space (common, a, b, all) a row from start[0] towards end[0]."""
    s, e = model.encode(start[:1]), model.encode(end[:1])
    rows = [model.interpolate(s, e, steps, space)[0] for space in ("common", "a", "b", "all")]
    return grid(torch.cat(rows).float().cpu(), nrow=steps)


@torch.no_grad()
def training_sample(model: Disentangler, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One picture of training progress: a-guides on b-contents, b-guides on a-contents, removals of both sets."""
    parts = [transfer_grid(model, b, a, target=0), transfer_grid(model, a, b, target=1), removal_rows(model, torch.cat([a, b]))]
    width = max(p.shape[2] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[2], 0, 8), value=1.0) for p in parts]
    return torch.cat(padded, dim=1)


@torch.no_grad()
def intersection_row(model: Disentangler, contents: torch.Tensor, guides_a: torch.Tensor, guides_b: torch.Tensor) -> torch.Tensor:
    """(3, H, W): columns content | a-guide | b-guide | G(E_c(content), E_sA(a-guide), E_sB(b-guide)), one row each."""
    out = model.intersect(contents, guides_a, guides_b)
    rows = torch.stack([contents, guides_a, guides_b, out], dim=1).flatten(0, 1)
    return grid(rows.float().cpu(), nrow=4)


@torch.no_grad()
def mask_rows(model: Disentangler, images: torch.Tensor) -> torch.Tensor:
    """(3, H, W) for mask models: the inputs, their attribute masks (white = attribute) and their removals."""
    masks = model.segment(images, "auto").expand(-1, 3, -1, -1) * 2 - 1
    rows = [images, masks, model.remove(images, "both")]
    return grid(torch.cat(rows).float().cpu(), nrow=images.shape[0])


def evaluation_figures(model: Disentangler, out_dir: str | Path, seed: int = 7919, n: int = 6) -> list[Path]:
    """The papers' figures for one synthetic-benchmark model, on test faces: transfer grids in both directions,
    the intersection, removal rows and interpolation strips (and input | mask | edit rows for mask models).
    Files are named after the model's pair; returns their paths."""
    from . import synthetic
    from .evaluate import synthetic_pair

    pair = synthetic_pair(model)
    size = model.config.image_size
    dev = model.device
    a = synthetic.render_domain(pair, "a", torch.arange(n), size, seed, dev)
    b = synthetic.render_domain(pair, "b", torch.arange(n, 2 * n), size, seed, dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        f"{pair}_transfer_to_b.png": transfer_grid(model, a, b[:4], target=1),
        f"{pair}_transfer_to_a.png": transfer_grid(model, b, a[:4], target=0),
        f"{pair}_intersection.png": intersection_row(model, b[:4], a.roll(1, 0)[:4], b.roll(2, 0)[:4]),
        f"{pair}_removal.png": removal_rows(model, torch.cat([a[:3], b[:3]])),
        f"{pair}_interpolation.png": interpolation_strips(model, a[:1], b[:1], steps=8),
    }
    if model.config.variant == "mask":
        figures[f"{pair}_mask.png"] = mask_rows(model, torch.cat([a[:3], b[:3]]))
    paths = []
    for name, image in figures.items():
        paths.append(save_grid(image[None], out / name))
    return paths


@torch.no_grad()
def digit_grid(model: Disentangler, sources: torch.Tensor, guides: torch.Tensor, target: int) -> torch.Tensor:
    """(3, H, W) grid: left column the source digits, top row the style guides (of domain `target`), cell (i, j) =
    source i drawn in guide j's style, G(E_c(source), E_sA(guide), 0) or G(E_c(source), 0, E_sB(guide))."""
    ns, ng = sources.shape[0], guides.shape[0]
    source = sources.repeat_interleave(ng, dim=0)  # (ns*ng, ...) row-major: source i, guide j
    guide = guides.repeat(ns, 1, 1, 1)
    edits = model.transfer(source, guide, target=target).view(ns, ng, *sources.shape[1:])
    blank = torch.ones_like(sources[:1])
    rows = [torch.cat([blank, guides])] + [torch.cat([sources[i : i + 1], edits[i]]) for i in range(ns)]
    return grid(torch.cat(rows).float().cpu(), nrow=ng + 1)


def _one_per_digit(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The first image of each digit 0-9 present, in digit order."""
    return torch.stack([images[(labels == d).nonzero()[0, 0]] for d in range(10) if (labels == d).any()])


def digit_figures(model: Disentangler, out_dir: str | Path, seed: int = 7919, n_guides: int = 8,
                  root: str | Path | None = None) -> list[Path]:
    """The domain-adaptation grids of a digits model on test digits, both directions: one source of each digit
    0-9 down the side, `n_guides` guides of the other domain across the top; and a row of each domain's sources
    over their reconstructions. Named after the model's pair (`PAIR_transfer_to_b.png`, ...); returns the paths."""
    from . import digits
    from .evaluate import _fit, digit_pair

    pair = digit_pair(model)
    if pair is None:
        raise ValueError(f"model domains {model.config.domain_a}/{model.config.domain_b} are not digit domains")
    size, dev = model.config.image_size, model.device
    (img_a, lab_a), (img_b, lab_b) = (digits.labelled(d, "test", seed=seed, root=root, n=200)
                                      for d in (model.config.domain_a, model.config.domain_b))
    src_a, src_b = (_fit(_one_per_digit(x, y), size).to(dev) for x, y in ((img_a, lab_a), (img_b, lab_b)))
    guide_a, guide_b = (_fit(x[-n_guides:], size).to(dev) for x in (img_a, img_b))
    with torch.no_grad():
        recon = torch.cat([src_a, model.reconstruct(src_a), src_b, model.reconstruct(src_b)])
    figures = {
        f"{pair}_transfer_to_b.png": digit_grid(model, src_a, guide_b, target=1),
        f"{pair}_transfer_to_a.png": digit_grid(model, src_b, guide_a, target=0),
        f"{pair}_reconstruction.png": grid(recon.float().cpu(), nrow=max(len(src_a), len(src_b))),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [save_grid(image[None], out / name) for name, image in figures.items()]
