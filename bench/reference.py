"""A transfer computed the way the published code computes it, as the benchmarks' baseline.

Written from the architecture facts of the published setup (docs: 128 px, six stride-2 4x4 convolutions per encoder
32-64-128-256-512 down to a 2x2 code map, instance norm and LeakyReLU 0.2, separate codes of 25 channels and a
common code of 512 - 2 * 25; a decoder of transposed convolutions 512-512-256-128-64-32-3 with tanh). Its
convolutions carry a spectral norm that runs one power iteration and divides the weight by its estimated largest
singular value on every forward, in eval mode too, and a transfer `G(E_c(a), 0, E_sB(b))` runs the common
encoder on the content and the separate encoder on the guide, then the decoder. It exists to be timed beside
`Disentangler.transfer`; its weights are random."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (32, 64, 128, 256, 512)  # the encoders' hidden widths at 128 px
CODE, SEP = 512, 25


class PowerIterationConv(nn.Module):
    """A (transposed) convolution whose weight is divided by its largest singular value, estimated by one power
    iteration on every call."""

    def __init__(self, c_in: int, c_out: int, transposed: bool = False):
        super().__init__()
        shape = (c_in, c_out, 4, 4) if transposed else (c_out, c_in, 4, 4)
        self.weight = nn.Parameter(torch.randn(shape) * 0.02)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.transposed = transposed
        rows = shape[0]
        self.register_buffer("u", F.normalize(torch.randn(rows), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.weight.shape[0], -1)
        v = F.normalize(w.t() @ self.u, dim=0)
        u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        sigma = u @ w @ v
        weight = self.weight / sigma
        if self.transposed:
            return F.conv_transpose2d(x, weight, self.bias, stride=2, padding=1)
        return F.conv2d(x, weight, self.bias, stride=2, padding=1)


def _encoder(out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for i, c in enumerate(WIDTHS):
        layers.append(PowerIterationConv(c_in, c))
        if i:
            layers.append(nn.InstanceNorm2d(c, affine=True))
        layers.append(nn.LeakyReLU(0.2))
        c_in = c
    layers.append(PowerIterationConv(c_in, out_channels))
    return nn.Sequential(*layers)


def _decoder() -> nn.Sequential:
    widths = (CODE, 512, 256, 128, 64, 32)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [PowerIterationConv(c_in, c_out, transposed=True), nn.InstanceNorm2d(c_out, affine=True), nn.ReLU()]
    layers += [PowerIterationConv(widths[-1], 3, transposed=True), nn.Tanh()]
    return nn.Sequential(*layers)


class ReferenceNets(nn.Module):
    """E_c, E_sB and G at 128 px, the published widths."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_common = _encoder(CODE - 2 * SEP)
        self.enc_b = _encoder(SEP)
        self.decoder = _decoder()

    def transfer(self, content: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """G(E_c(content), 0, E_sB(guide)): (N, 3, 128, 128) from two (N, 3, 128, 128) batches."""
        common, sep_b = self.enc_common(content), self.enc_b(guide)
        zeros = torch.zeros_like(sep_b)
        return self.decoder(torch.cat([common, zeros, sep_b], dim=1))
