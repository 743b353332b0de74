"""The three networks of the method: one encoder class (used for the common and both separate codes), one decoder,
one latent discriminator. Shapes in comments are for the published 128 px configuration."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from .config import ModelConfig


def _down(c_in: int, c_out: int, norm: bool) -> nn.Sequential:
    """4x4 stride-2 convolution (spectral norm) -> instance norm -> LeakyReLU 0.2: halves the map."""
    layers: list[nn.Module] = [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1))]
    if norm:
        layers.append(nn.InstanceNorm2d(c_out, affine=True))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """4x4 stride-2 transposed convolution -> layer norm over (C, H, W) -> ReLU: doubles the map.

    The decoder normalises per sample over all channels (GroupNorm with one group) rather than per channel:
    instance norm on the 4x4 map right after the 2x2 code would erase each channel's mean, which is where the
    size of a separate code (and so an edit's `strength`) lives. One group keeps outputs independent of the batch.
    """
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(1, c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Image (N, 3, S, S) -> code map (N, out_channels, 2, 2).

    The same class is the common encoder E_c (out_channels = common) and both separate encoders E_sA, E_sB
    (out_channels = sep). 128 px: 3 -> 32 (64x64) -> 64 (32) -> 128 (16) -> 256 (8) -> 512 (4) -> out (2).
    """

    def __init__(self, config: ModelConfig, out_channels: int):
        super().__init__()
        widths = (3, *config.hidden_widths)
        self.body = nn.Sequential(*(_down(c_in, c_out, norm=i > 0) for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))))
        # The code layer: no norm or activation, so a separate code can be exactly zero (the zero loss) or any size.
        self.head = spectral_norm(nn.Conv2d(widths[-1], out_channels, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Decoder(nn.Module):
    """Concatenated codes (N, common + 2*sep, 2, 2) -> image (N, 3, S, S) in [-1, 1].

    128 px: 512 (2x2) -> 512 (4) -> 256 (8) -> 128 (16) -> 64 (32) -> 32 (64) -> 3 (128), tanh.

    The mask variant's last layer has a fourth output channel, the logit of the attribute's mask: forward then
    returns (N, 4, S, S), RGB (tanh) in channels 0-2 and the mask (sigmoid, in [0, 1]) in channel 3. One layer
    rather than a second head keeps the mask aligned pixel for pixel with the RGB it gates; plain models keep
    their 3-channel layer, so their checkpoints load unchanged.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = (config.code_channels, *reversed(config.hidden_widths))
        self.has_mask = config.has_mask
        self.body = nn.Sequential(*(_up(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])))
        self.to_rgb = nn.ConvTranspose2d(widths[-1], 4 if self.has_mask else 3, 4, 2, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        out = self.to_rgb(self.body(code))
        if not self.has_mask:
            return torch.tanh(out)
        return torch.cat([torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:])], dim=1)


class LatentDiscriminator(nn.Module):
    """Common code (N, common, 2, 2) -> logit (N,) that the code came from domain a (training only).

    Plain linear layers, as in the published code, with no spectral norm: a Lipschitz-bounded discriminator cannot
    see an attribute that the common code carries in small differences the decoder still reads (docs/research.md).
    """

    def __init__(self, config: ModelConfig, groups: int = 2):
        super().__init__()
        if groups < 2:
            raise ValueError(f"a discriminator tells at least 2 groups apart, not {groups}")
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.common_size, config.disc_hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(config.disc_hidden, 1 if groups == 2 else groups),
        )

    def forward(self, common: torch.Tensor) -> torch.Tensor:
        """(N,) logits of domain a for the two domains; (N, groups) logits for more groups (training with faces of
        neither attribute as a third group)."""
        out = self.net(common)
        return out.squeeze(1) if out.shape[1] == 1 else out


def bake_spectral_norm(model: nn.Module) -> nn.Module:
    """Replace each spectral-norm parametrisation by the weight it yields in eval mode (W / sigma), so inference
    stops recomputing sigma for every layer on every call. Outputs are unchanged; the model must be in eval mode
    (in training mode the parametrisation would run a power iteration first)."""
    assert not model.training
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


class DenseConv(nn.Module):
    """A convolution at one input size, computed as the one matrix it applies to the flattened map.

    Either side of the 2x2 code map (each encoder's last layer, 4x4 -> 2x2, and the decoder's first, 2x2 -> 4x4)
    a layer is a small map with many channels, where oneDNN's convolution kernels run far below the CPU's matrix
    throughput (and reorder their weights on every call): in one-thread bf16 probes at paper widths one matrix
    product over the flattened map was 3x (encoder head) and 4.7x (decoder's first layer) faster there
    (docs/benchmarks.md, "Transfer inference throughput", for the whole transfer). The matrix links every input
    position to every output position the kernel reaches, (H_in W_in)(H_out W_out) / k^2 times the kernel's size: 4x
    for those two layers. It is computed in float64 from the layer's weights, so the
    results are the convolution's up to float rounding. The output keeps the input's memory format.
    """

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, in_size: tuple[int, int]):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError("DenseConv takes ungrouped, undilated convolutions")
        h, w = in_size
        kh, kw = conv.kernel_size
        transposed = isinstance(conv, nn.ConvTranspose2d)
        with torch.no_grad():
            # taps[p, t, q] = 1 where kernel tap t links input position p to output position q: the layer's own
            # geometry applied to one-hot positions with one one-hot kernel per tap.
            positions = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
            one_hot = torch.eye(kh * kw, dtype=torch.float64).reshape(kh * kw, 1, kh, kw)
            if transposed:
                taps = F.conv_transpose2d(positions, one_hot.transpose(0, 1), stride=conv.stride, padding=conv.padding,
                                          output_padding=conv.output_padding)
                kernel = conv.weight.to(torch.float64).reshape(conv.in_channels, conv.out_channels, -1).transpose(0, 1)
            else:
                taps = F.conv2d(positions, one_hot, stride=conv.stride, padding=conv.padding)
                kernel = conv.weight.to(torch.float64).reshape(conv.out_channels, conv.in_channels, -1)
            self.out_size = (taps.shape[-2], taps.shape[-1])
            taps = taps.reshape(h * w, kh * kw, -1)
            # Rows (output position, output channel), columns (input position, input channel): channels-last order
            # on both sides, so a channels_last map flattens without a copy.
            dense = torch.einsum("oct,ptq->qopc", kernel, taps).reshape(-1, h * w * conv.in_channels)
            bias = None if conv.bias is None else conv.bias.detach().repeat(self.out_size[0] * self.out_size[1])
        self.register_buffer("weight", dense.to(conv.weight.dtype))
        self.register_buffer("bias", bias)
        self.in_features, self.out_channels = h * w * conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n, self.in_features), self.weight, self.bias)
        out = y.view(n, *self.out_size, self.out_channels).permute(0, 3, 1, 2)  # channels_last strides
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def inference_ready(model: nn.Module) -> nn.Module:
    """An eval-mode model made ready to serve: spectral norm baked (`bake_spectral_norm`) and, on the CPU, the
    layers on either side of the 2x2 code map computed as matrices (`DenseConv`). Outputs are unchanged up to float
    rounding; the networks keep their interfaces. CUDA keeps cuDNN's kernels there, not having been measured against
    the matrices."""
    bake_spectral_norm(model)
    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        if isinstance(module, Encoder) and isinstance(module.head, nn.Conv2d):
            module.head = DenseConv(module.head, (4, 4))
        elif isinstance(module, Decoder) and len(module.body) and isinstance(module.body[0][0], nn.ConvTranspose2d):
            module.body[0][0] = DenseConv(module.body[0][0], (2, 2))
    return model
