"""The three networks of the method: one encoder class (used for the common and both separate codes), one decoder,
one latent discriminator. Shapes in comments are for the published 128 px configuration."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from .config import ModelConfig


def _down(c_in: int, c_out: int, norm: bool, stride: int = 2) -> nn.Sequential:
    """4x4 stride-2 convolution (spectral norm) -> instance norm -> LeakyReLU 0.2: halves the map. Stride 1 (a 3x3
    convolution) keeps it: the layers of a common encoder past its map's size."""
    conv = nn.Conv2d(c_in, c_out, 4, 2, 1) if stride == 2 else nn.Conv2d(c_in, c_out, 3, 1, 1)
    layers: list[nn.Module] = [spectral_norm(conv)]
    if norm:
        layers.append(nn.InstanceNorm2d(c_out, affine=True))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def _up(c_in: int, c_out: int, stride: int = 2) -> nn.Sequential:
    """4x4 stride-2 transposed convolution -> layer norm over (C, H, W) -> ReLU: doubles the map. Stride 1 (a 3x3
    convolution) keeps it: the decoder's layers before a larger common map's size.

    The decoder normalises per sample over all channels (GroupNorm with one group) rather than per channel:
    instance norm on the 4x4 map right after the 2x2 code would erase each channel's mean, which is where the
    size of a separate code (and so an edit's `strength`) lives. One group keeps outputs independent of the batch.
    """
    conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1) if stride == 2 else nn.Conv2d(c_in, c_out, 3, 1, 1)
    return nn.Sequential(conv, nn.GroupNorm(1, c_out), nn.ReLU(inplace=True))


def _strides(layers: int, halvings: int) -> list[int]:
    """Strides of `layers` layers of which the first `halvings` halve (or, read backwards, double) the map."""
    return [2] * halvings + [1] * (layers - halvings)


class Encoder(nn.Module):
    """Image (N, 3, S, S) -> code map (N, out_channels, map_side, map_side), 2x2 unless a larger common map or a
    pooled (1x1) separate code is asked.

    The same class is the common encoder E_c (out_channels = common) and both separate encoders E_sA, E_sB
    (out_channels = sep). 128 px: 3 -> 32 (64x64) -> 64 (32) -> 128 (16) -> 256 (8) -> 512 (4) -> out (2). A
    larger map_side keeps the layer count and widths: the layers past that side are 3x3 stride-1 convolutions. A
    map_side of 1 averages the 2x2 code over the map.

    `reads`: "image"; "contrast", the image's contrast map (`contrast`), for a common encoder that should see shapes
    without colours; "image+colours", the image, with its ground and stroke colours (`colours`) added to the code
    through a linear layer, for the separate encoders beside such a common encoder.
    """

    def __init__(self, config: ModelConfig, out_channels: int, map_side: int = 2, reads: str = "image"):
        super().__init__()
        self.reads = reads
        self.pooled = map_side == 1  # the 2x2 map averaged into one code of the whole image
        widths = (3, *config.hidden_widths)
        strides = _strides(config.num_layers, config.halvings(max(map_side, 2)))
        self.image_size = config.image_size
        self.body = nn.Sequential(*(_down(c_in, c_out, norm=i > 0, stride=st)
                                    for i, (c_in, c_out, st) in enumerate(zip(widths, widths[1:], strides))))
        # The code layer: no norm or activation, so a separate code can be exactly zero (the zero loss) or any size.
        head = nn.Conv2d(widths[-1], out_channels, 4, 2, 1) if strides[-1] == 2 else nn.Conv2d(widths[-1], out_channels, 3, 1, 1)
        self.head = spectral_norm(head)

        # The colours reach the code directly: the instance norms after the first layer subtract each channel's mean, so
        # the body passes on little of an image's colours, and the common code of a contrast map none at all. Without
        # this the digit model's SynDigits reconstructions and translations came out grey (docs/research.md).
        self.colour = nn.Linear(6, out_channels) if reads == "image+colours" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.head(self.body(contrast(x) if self.reads == "contrast" else x))
        if self.pooled:
            code = code.mean((2, 3), keepdim=True)
        if self.colour is None:
            return code
        return code + self.colour(colours(x).to(code.dtype))[:, :, None, None]


CONTRAST_TOP = 0.98  # the contrast map's 1 is the distance that this share of an image's pixels stay under


def _ground_and_map(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 1) median colour of each image and (N, H W) its contrast map in [0, 1] (see `contrast`)."""
    h, w = x.shape[-2:]
    flat = x.float().flatten(2)  # (N, 3, H W)
    k = h * w
    median = flat.kthvalue((k + 1) // 2, dim=2, keepdim=True).values  # (N, 3, 1): the ground's colour
    # (N, H W). The clamp keeps the gradient finite where a pixel has the ground's colour exactly (sqrt's slope at 0 is
    # infinite), which terms that back-propagate into decoded images through these maps reach; the values it changes
    # (0 -> 1e-15) vanish in float32 wherever they are used.
    dist = (flat - median).square().sum(1).clamp_min(1e-30).sqrt()
    top = dist.kthvalue(max(1, round(CONTRAST_TOP * k)), dim=1, keepdim=True).values.clamp_min(1e-3)
    return median, (dist / top).clamp(max=1)


def colours(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) -> (N, 6) float32: the ground's colour (the median) and the strokes' colour (the mean
    colour weighted by the contrast map), what a contrast map leaves out."""
    median, weight = _ground_and_map(x)
    flat = x.float().flatten(2)
    stroke = (flat * weight[:, None]).sum(2) / weight.sum(1, keepdim=True).clamp_min(1e-3)
    return torch.cat([median[:, :, 0], stroke], 1)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> their contrast maps (N, 3, H, W) in [-1, 1], one map in all three channels:
    each pixel's distance in colour from the image's median colour, over the distance that CONTRAST_TOP of its pixels
    stay under (1 above it).

    A view with neither colour nor polarity: a dark stroke on a light ground and a light one on a dark ground, red
    on green or white on black, give the same map. Where two domains differ in exactly those (handwritten digits and
    street numbers), a common encoder that reads this map sees the shapes the domains share, which the latent
    adversary alone did not align (docs/research.md, "Domain adaptation on digits")."""
    n, c, h, w = x.shape
    out = _ground_and_map(x)[1] * 2 - 1
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return out.view(n, 1, h, w).expand(n, c, h, w).to(x.dtype).contiguous(memory_format=layout)


class Decoder(nn.Module):
    """Concatenated codes (N, common + 2*sep, M, M) -> image (N, 3, S, S) in [-1, 1], M the common map's side (the
    separate codes spread to it: `Disentangler.decode_parts`).

    128 px: 512 (2x2) -> 512 (4) -> 256 (8) -> 128 (16) -> 64 (32) -> 32 (64) -> 3 (128), tanh. With a larger
    common map the first layers are 3x3 stride-1 convolutions at its side, the same count and widths.

    The mask variant's last layer has a fourth output channel, the logit of the attribute's mask: forward then
    returns (N, 4, S, S), RGB (tanh) in channels 0-2 and the mask (sigmoid, in [0, 1]) in channel 3. One layer
    rather than a second head keeps the mask aligned pixel for pixel with the RGB it gates; plain models keep
    their 3-channel layer, so their checkpoints load unchanged.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = (config.code_channels, *reversed(config.hidden_widths))
        self.has_mask = config.has_mask
        strides = _strides(config.num_layers, config.halvings(config.common_map))[::-1]
        self.code_side = config.common_map
        self.body = nn.Sequential(*(_up(c_in, c_out, st) for c_in, c_out, st in zip(widths, widths[1:], strides)))
        self.to_rgb = nn.ConvTranspose2d(widths[-1], 4 if self.has_mask else 3, 4, 2, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        out = self.to_rgb(self.body(code))
        # bf16 on the CPU: the float32 kernels of tanh and sigmoid, with the casts, took less than half the time of
        # bf16's own in probes at 128 px (batch 16); the result is rounded to bf16 as before.
        wide = out.float() if out.dtype == torch.bfloat16 and out.device.type == "cpu" else out
        if not self.has_mask:
            return torch.tanh(wide).to(out.dtype)
        return torch.cat([torch.tanh(wide[:, :3]), torch.sigmoid(wide[:, 3:])], dim=1).to(out.dtype)


class LatentDiscriminator(nn.Module):
    """Common code (N, common, M, M) -> logit (N,) that the code came from domain a (training only).

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


class UnfoldedConv(nn.Module):
    """A 4x4 stride-2 convolution or transposed convolution computed as one matrix product over its input's windows.

    On maps of 4x4 to 16x16 with hundreds of channels, oneDNN's convolution kernels run well below the CPU's matrix
    throughput; gathering the windows (im2col, in channels-last order, so a channels_last map needs no transposing)
    and multiplying them by the kernel as one matrix runs near it. A convolution's windows are its k x k patches at
    its stride. A 4x4 stride-2 transposed convolution (padding 1) is four 2x2 convolutions, one per output phase
    (row and column parity): output (2i + r, 2j + s) reads the input's 2x2 window at (i + r - 1, j + s - 1), so one
    product of every 2x2 window of the once-padded input with the four phases' kernels side by side gives all four,
    which are then interleaved. The matrix is built in float64 from the layer's weights, so the results are the
    layer's up to float rounding. The output keeps the input's memory format.
    """

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d):
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        if geometry != ((4, 4), (2, 2), (1, 1), (1, 1), 1) or (self.transposed and conv.output_padding != (0, 0)):
            raise ValueError(f"UnfoldedConv takes 4x4 stride-2 padding-1 layers, not {conv}")
        with torch.no_grad():
            w = conv.weight.to(torch.float64)
            if self.transposed:  # (in, out, 4, 4) -> rows (dy, dx, in), columns (r, s, out)
                taps = torch.tensor([[3, 1], [2, 0]])  # taps[r, d]: the kernel row read by phase r at window offset d
                w = w[:, :, taps[:, :, None, None], taps[None, None, :, :]]  # (in, out, r, dy, s, dx)
                matrix = w.permute(3, 5, 0, 2, 4, 1).reshape(4 * conv.in_channels, 4 * conv.out_channels)
                self.window, self.stride = 2, 1
            else:  # (out, in, 4, 4) -> rows (ky, kx, in), columns out
                matrix = w.permute(2, 3, 1, 0).reshape(16 * conv.in_channels, conv.out_channels)
                self.window, self.stride = 4, 2
        self.register_buffer("weight", matrix.to(conv.weight.dtype))
        # Each output pixel gets exactly one phase's column, so the bias repeats once per phase and joins the product.
        bias = None if conv.bias is None else conv.bias.detach().repeat(4 if self.transposed else 1)
        self.register_buffer("bias", bias)
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, st = self.window, self.stride
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H + 2, W + 2, C)
        ho, wo = (h + 2 - k) // st + 1, (w + 2 - k) // st + 1
        s0, s1, s2, s3 = padded.stride()
        windows = padded.as_strided((n, ho, wo, k, k, c), (s0, s1 * st, s2 * st, s1, s2, s3))
        flat = windows.reshape(n * ho * wo, k * k * c)
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        if not self.transposed:
            out = y.view(n, ho, wo, self.out_channels)
        else:
            y = y.view(n, ho, wo, 2, 2, self.out_channels)
            out = x.new_empty(n, h, 2, w, 2, self.out_channels)
            for r in (0, 1):
                for s in (0, 1):
                    out[:, :, r, :, s] = y[:, r:r + h, s:s + w, r, s]
            out = out.view(n, 2 * h, 2 * w, self.out_channels)
        out = out.permute(0, 3, 1, 2)  # channels_last strides
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class ChannelsLastInstanceNorm(nn.Module):
    """An affine InstanceNorm2d (no running statistics) that reads a channels_last map in place, statistics in float32.

    A channels_last map viewed as (N, H W, C) is contiguous, so each channel's sum and sum of squares are column sums
    of that view and the affine map is one fused multiply-add, with no transposing copies; the built-in instance norm
    first copies the map to the contiguous layout. One-thread probes (batch 16, paper widths) measured it 2.3-3x
    faster in float32 on every map of the encoders, and in bf16 1.2-3.5x on the 16x16 to 4x4 maps but slower on
    32x32. Float32 sums keep the statistics as exact as the built-in's (float64 inputs keep float64). Inputs in the
    contiguous layout take the built-in path; the output keeps the input's dtype and memory format."""

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        if not norm.affine or norm.track_running_stats:
            raise ValueError("ChannelsLastInstanceNorm takes affine instance norms without running statistics")
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # the built-in norm refuses an empty batch
            return torch.empty_like(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            return self.norm(x)
        n, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: no copy
        acc = torch.promote_types(x.dtype, torch.float32)
        mean = flat.sum(1, keepdim=True, dtype=acc) / (h * w)
        var = (flat.to(acc).square().mean(1, keepdim=True) - mean * mean).clamp_min(0)
        scale = self.norm.weight.to(acc) * torch.rsqrt(var + self.norm.eps)
        shift = self.norm.bias.to(acc) - mean * scale
        y = torch.addcmul(shift.to(x.dtype), flat, scale.to(x.dtype))
        return y.view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last strides


def _halves(layer: nn.Module) -> bool:
    """Whether a layer is one of the 4x4 stride-2 (transposed) convolutions that halve (double) a map; the
    stride-1 layers at a larger common map's side keep it."""
    return isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.stride == (2, 2)


UNFOLD_MIN_CHANNELS = 256  # UnfoldedConv where a layer has this many output channels ...
UNFOLD_MAX_MAP = 16  # ... and an input map of at most this side, in bf16
NORM_MAX_MAP_BF16 = 16  # ChannelsLastInstanceNorm in bf16 on maps up to this side (slower on 32x32)


def inference_ready(model: nn.Module, matrices: bool = True) -> nn.Module:
    """An eval-mode model made ready to serve: spectral norm baked (`bake_spectral_norm`) and, on the CPU:

    - each encoder's instance norms read channels_last maps in place (`ChannelsLastInstanceNorm`): in float32 all
      of them, in bf16 those on maps of at most NORM_MAX_MAP_BF16;
    - the layers on either side of the 2x2 code map computed as matrices: an encoder's last layer (4x4 -> 2x2) as
      one product over its windows (`UnfoldedConv`) when it has at least UNFOLD_MIN_CHANNELS outputs (the common
      code at paper widths), else, like the decoder's first layer (2x2 -> 4x4), as the one matrix it applies to
      the flattened map (`DenseConv`). One-thread probes at paper widths measured the common head's windows 3.4x
      (batch 1) to 1.3x (batch 32) faster than the dense matrix in float32 and 3.7x to 1.05x in bf16; the small
      separate-code heads and the decoder's first layer ran faster dense;
    - in bf16 also the 4x4 stride-2 layers with at least UNFOLD_MIN_CHANNELS outputs on maps of at most
      UNFOLD_MAX_MAP (`UnfoldedConv`): at paper widths the encoders' layers from 16x16 and 8x8 and the decoder's
      from 4x4. One-thread bf16 probes at 128 px, batch 16, measured those at 1.3x, 2.1x and 2.7x oneDNN's kernels
      there; in float32, and on fewer channels (the slim preset), oneDNN's were as fast or faster.

    Outputs are unchanged up to float rounding; the networks keep their interfaces. CUDA keeps cuDNN's kernels and
    the built-in norms, not having been measured against either; `matrices` False leaves every layer a
    convolution (the benchmark's comparison) and only changes the norms."""
    bake_spectral_norm(model)
    first = next(model.parameters())
    if first.device.type != "cpu":
        return model
    bf16 = first.dtype == torch.bfloat16

    def unfolded(layer: nn.Module, in_side: int) -> nn.Module:
        wide = getattr(layer, "out_channels", 0) >= UNFOLD_MIN_CHANNELS
        return UnfoldedConv(layer) if matrices and bf16 and wide and in_side <= UNFOLD_MAX_MAP and _halves(layer) else layer

    for module in model.modules():
        if isinstance(module, Encoder) and isinstance(module.head, nn.Conv2d):
            side = module.image_size
            for block in module.body:
                conv, block[0] = block[0], unfolded(block[0], side)
                side //= 2 if _halves(conv) else 1
                if isinstance(block[1], nn.InstanceNorm2d) and (not bf16 or side <= NORM_MAX_MAP_BF16):
                    block[1] = ChannelsLastInstanceNorm(block[1])
            if matrices and side == 4 and _halves(module.head):  # the head onto a 2x2 code map
                wide = module.head.out_channels >= UNFOLD_MIN_CHANNELS
                module.head = UnfoldedConv(module.head) if wide else DenseConv(module.head, (4, 4))
        elif matrices and isinstance(module, Decoder) and len(module.body):
            side = module.code_side
            for j, block in enumerate(module.body):
                if _halves(block[0]):  # a transposed convolution, doubling the map
                    block[0] = DenseConv(block[0], (2, 2)) if j == 0 and side == 2 else unfolded(block[0], side)
                    side *= 2
    return model
