"""The papers' figures as image tensors: transfer grids (guides down the side, contents across the top, like
Figure 2 of Benaim et al.), removal rows and interpolation strips. Used for training samples and evaluation."""
from __future__ import annotations

import torch

from models.disentangler import Disentangler
from models.images import grid


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
