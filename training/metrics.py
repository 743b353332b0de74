"""Image and distribution metrics of the evaluation, each a small function checked against hand-computed values
in the tests. Images are (N, 3, H, W) tensors in [-1, 1], as everywhere in the project; PSNR and L1 are computed
on the [0, 1] scale, the convention of the image-quality literature."""
from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.double() + 1) / 2


def psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1 on the [0, 1] scale). With `mask` (N, 1, H, W) in [0, 1], only the weighted
    pixels count (images whose mask is empty get NaN). Identical images are capped at 100 dB."""
    err = (_unit(x) - _unit(y)) ** 2
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        w = mask.double().expand_as(err)
        total = w.flatten(1).sum(1)
        mse = (err * w).flatten(1).sum(1) / total
        mse = torch.where(total > 0, mse, torch.full_like(mse, float("nan")))
    return (10 * torch.log10(1 / mse.clamp_min(eps))).clamp_max(100.0)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error on the [0, 1] scale."""
    return (_unit(x) - _unit(y)).abs().flatten(1).mean(1)


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) feature sets."""
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1)


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) of two (N, D) feature sets: the unbiased MMD^2 with the
    cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets; returns (mean, std)."""
    real, fake = real.double(), fake.double()
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    d = real.shape[1]
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=gen)[:m]]
        f = fake[torch.randperm(fake.shape[0], generator=gen)[:m]]
        k_rr = (r @ r.T / d + 1) ** 3
        k_ff = (f @ f.T / d + 1) ** 3
        k_rf = (r @ f.T / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        mmd = (k_rr * off).sum() / (m * (m - 1)) + (k_ff * off).sum() / (m * (m - 1)) - 2 * k_rf.mean()
        values.append(mmd.item())
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets:
    |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r^1/2 S_f S_r^1/2)^1/2), computed with symmetric eigendecompositions."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = torch.cov(real.T), torch.cov(fake.T)
    root = _sqrt_psd(s_r)
    cross = torch.linalg.eigvalsh(root @ s_f @ root).clamp_min(0).sqrt().sum()
    return ((mu_r - mu_f).square().sum() + torch.trace(s_r) + torch.trace(s_f) - 2 * cross).item()


def iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of two boolean (N, 1, H, W) masks (1 where both are empty)."""
    inter = (pred & truth).flatten(1).sum(1).double()
    union = (pred | truth).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
