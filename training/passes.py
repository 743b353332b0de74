"""The forward pass of a training step: every image the loss terms read, as named fields.

Both domains go through each encoder and the decoder as one concatenated batch (every layer is per-sample, so this
equals separate passes and runs faster); the fields below are the slices of those batches, named by what they are.
Fields are float32 even when the pass ran under bf16 autocast, so the terms compute in full precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.disentangler import Codes, Disentangler

from . import losses


@dataclass
class NeitherPass:
    """Faces n with neither attribute: their codes and the attribute-free decode G(E_c(n), 0, 0) (RGB)."""

    codes: Codes
    decoded: torch.Tensor


@dataclass
class PlainPass:
    """The plain variant: codes of both batches, the reconstructions and (when a term reads them) the removals."""

    codes_a: Codes
    codes_b: Codes
    recon_a: torch.Tensor  # G(c_a, sA_a, 0)
    recon_b: torch.Tensor  # G(c_b, 0, sB_b)
    removed_a: torch.Tensor | None  # G(c_a, 0, 0), decoded only when a term reads it
    removed_b: torch.Tensor | None  # G(c_b, 0, 0)
    neither: NeitherPass | None
    translated_a: torch.Tensor | None = None  # G(c_a, 0, sB_b): a's content given b's separate code, when a term
    translated_b: torch.Tensor | None = None  # reads the code cycle; G(c_b, sA_a, 0)
    cycle_a: Codes | None = None  # E(translated_a)
    cycle_b: Codes | None = None  # E(translated_b)


@dataclass
class MaskPass:
    """The mask variant: every decode is (rgb, mask) of the decoder; the translations are composited over their
    content's attribute-free base, as `Disentangler.decode` renders them, and re-encoded for the code cycle."""

    codes_a: Codes
    codes_b: Codes
    rgb_a: torch.Tensor  # G(c_a, sA_a, 0): the generator's RGB ...
    mask_a: torch.Tensor  # ... and its mask
    rgb_b: torch.Tensor  # G(c_b, 0, sB_b)
    mask_b: torch.Tensor
    base_a: torch.Tensor  # RGB of G(c_a, 0, 0): a without attributes
    base_b: torch.Tensor  # RGB of G(c_b, 0, 0)
    trans_mask_a: torch.Tensor  # mask of G(c_a, 0, sB_b): a's content with b's attribute
    trans_mask_b: torch.Tensor  # mask of G(c_b, sA_a, 0): b's content with a's attribute
    translated_a: torch.Tensor  # the composited translation of a's content given b's attribute
    translated_b: torch.Tensor  # of b's content given a's attribute
    cycle_a: Codes  # E(translated_a)
    cycle_b: Codes  # E(translated_b)
    neither: NeitherPass | None

    @property
    def recon_a(self) -> torch.Tensor:
        """m_a * rgb_a + (1 - m_a) * base_a, the masked reconstruction of a."""
        return losses.composite(self.rgb_a, self.mask_a, self.base_a)

    @property
    def recon_b(self) -> torch.Tensor:
        return losses.composite(self.rgb_b, self.mask_b, self.base_b)

    @property
    def removed_a(self) -> torch.Tensor:
        """The attribute-free decode G(c_a, 0, 0), the base every composite of a starts from."""
        return self.base_a

    @property
    def removed_b(self) -> torch.Tensor:
        return self.base_b


def noisy_common(common: torch.Tensor, sigma: float) -> torch.Tensor:
    """The common code with Gaussian noise of std `sigma` times each image's RMS code value, for training decodes.

    An information bottleneck on the common code (as in LORD, Gabbay and Hoshen, ICLR 2020), not in the papers: the
    latent adversary stops differences between the domains' common codes that it can see, but the decoder can still
    read an attribute out of differences too small for it. Noise drowns small differences, so the decoder has to
    take the attribute from the separate code. The noise follows each image's RMS (detached) because the decoder
    normalises its first layer per image: only the code's relative size matters. Inference decodes the clean code."""
    if not sigma:
        return common
    rms = common.detach().float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().to(common.dtype)
    return common + sigma * rms * torch.randn_like(common)


class Generator(nn.Module):
    """The encoders and decoder as one forward pass, so DistributedDataParallel sees every parameter used."""

    def __init__(self, model: Disentangler, removal: bool = False, common_noise: float = 0.0, cycle: bool = False):
        super().__init__()
        self.model = model
        self.removal = removal  # plain: also decode G(c, 0, 0) for the terms that read the removals
        self.cycle = cycle  # plain: also decode the translations and re-encode them, for the code cycle
        self.common_noise = common_noise  # decodes see noisy_common(E_c(x)); the adversary sees the clean code

    def forward(self, a: torch.Tensor, b: torch.Tensor, neither: torch.Tensor | None = None) -> PlainPass | MaskPass:
        n = a.shape[0]
        codes = self.model.encode(torch.cat([a, b]) if neither is None else torch.cat([a, b, neither]))
        codes_a, codes_b = codes.index(slice(0, n)), codes.index(slice(n, 2 * n))
        extra = None
        if neither is not None:
            codes_n = codes.index(slice(2 * n, None))
            decoded = self.model.decode_parts(noisy_common(codes_n.common, self.common_noise))[0]
            extra = NeitherPass(codes_n, decoded.float())
        if self.model.config.has_mask:
            return self._mask_pass(codes_a, codes_b, extra)
        common = noisy_common(torch.cat([codes_a.common, codes_b.common]), self.common_noise)
        zeros = torch.zeros_like(codes_a.sep_a)
        sep_a, sep_b = torch.cat([codes_a.sep_a, zeros]), torch.cat([zeros, codes_b.sep_b])
        both = common  # (2n): a's and b's common codes
        if self.removal:  # the attribute-free decodes ride in the same decoder call
            common, sep_a, sep_b = (torch.cat([both, both]), torch.cat([sep_a, torch.zeros_like(sep_a)]),
                                    torch.cat([sep_b, torch.zeros_like(sep_b)]))
        if self.cycle:  # and so do the translations: a's common code with b's separate code, b's with a's
            common = torch.cat([common, both])
            sep_a, sep_b = torch.cat([sep_a, zeros, codes_a.sep_a]), torch.cat([sep_b, codes_b.sep_b, zeros])
        # (2n, 4n, 6n, 3, S, S): recon a, recon b[, removed a, removed b][, translated a, translated b]
        out = self.model.decode(common, sep_a, sep_b).float()
        removed_a, removed_b = (out[2 * n : 3 * n], out[3 * n : 4 * n]) if self.removal else (None, None)
        result = PlainPass(codes_a, codes_b, out[:n], out[n : 2 * n], removed_a, removed_b, extra)
        if self.cycle:
            result.translated_a, result.translated_b = out[-2 * n : -n], out[-n:]
            cycle = self.model.encode(out[-2 * n :])
            cycle = Codes(*(t.float() for t in cycle))
            result.cycle_a, result.cycle_b = cycle.index(slice(0, n)), cycle.index(slice(n, None))
        return result

    def _mask_pass(self, codes_a: Codes, codes_b: Codes, neither: NeitherPass | None) -> MaskPass:
        n = codes_a.sep_a.shape[0]
        zeros = torch.zeros_like(codes_a.sep_a)
        common = noisy_common(torch.cat([codes_a.common, codes_b.common]), self.common_noise)
        ca, cb, sa, sb = common[:n], common[n:], codes_a.sep_a, codes_b.sep_b
        # six decodes in one call, in blocks of n: recon a, recon b, base a, base b, a given b's, b given a's
        rgb, mask = self.model.decode_parts(
            torch.cat([ca, cb, ca, cb, ca, cb]),
            torch.cat([sa, zeros, zeros, zeros, zeros, sa]),
            torch.cat([zeros, sb, zeros, zeros, sb, zeros]),
        )
        rgb_a, rgb_b, base_a, base_b, trans_rgb_a, trans_rgb_b = rgb.float().split(n)
        mask_a, mask_b, _, _, trans_mask_a, trans_mask_b = mask.float().split(n)
        translated_a = losses.composite(trans_rgb_a, trans_mask_a, base_a)
        translated_b = losses.composite(trans_rgb_b, trans_mask_b, base_b)
        cycle = self.model.encode(torch.cat([translated_a, translated_b]))
        cycle = Codes(*(t.float() for t in cycle))
        return MaskPass(codes_a, codes_b, rgb_a, mask_a, rgb_b, mask_b, base_a, base_b, trans_mask_a, trans_mask_b,
                        translated_a, translated_b, cycle.index(slice(0, n)), cycle.index(slice(n, None)), neither)
