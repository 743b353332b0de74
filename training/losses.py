"""The losses of Benaim et al. (ICCV 2019), one small function each, written to be checked against the paper.

Notation: a, b are batches of the two domains; E_c, E_sA, E_sB the encoders; G the decoder; d the latent
discriminator (logit that a common code came from domain a). L1 norms are means over all elements, so the loss
weights do not depend on image or code size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim

from models.disentangler import Codes


def reconstruction(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1(G(E_c(a), E_sA(a), 0), a) for domain a, and likewise G(E_c(b), 0, E_sB(b)) against b."""
    return (recon - target).abs().mean()


def structure(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM(recon, target) on [0, 1] images (11x11 Gaussian window): an optional term beside the L1
    reconstruction, not in the papers. L1 pays for a feature in proportion to its area, so a blurry decoder learns
    hair and background long before a thin mouth or the pupils; SSIM compares local contrast and structure in every
    window, so a missing mouth costs as much as a wrong cheek. On the synthetic benchmark it is what makes the
    smile appear in reconstructions at all (docs/evaluation.md). SSIM is blind to a uniform colour shift, which the
    L1 term keeps in check."""
    return 1 - ssim(recon.float() * 0.5 + 0.5, target.float() * 0.5 + 0.5, data_range=1.0)


def zero(sep_a_of_b: torch.Tensor, sep_b_of_a: torch.Tensor) -> torch.Tensor:
    """|E_sA(b)|_1 + |E_sB(a)|_1: a domain's separate encoder says nothing about the other domain's images."""
    return sep_a_of_b.abs().mean() + sep_b_of_a.abs().mean()


def removal_codes(sep_a_of_removed: torch.Tensor, sep_b_of_removed: torch.Tensor) -> torch.Tensor:
    """|E_sA(r)|_1 + |E_sB(r)|_1 for the attribute-free decodes r = G(E_c(x), 0, 0) of both domains: a term of
    our own, not in the papers, in the spirit of the mask paper's code cycle. The zero term teaches each separate
    encoder to answer 0 on faces without its attribute; an attribute that the common code smuggles into r makes
    them answer, and this term charges the decoder (and the common encoder) for it. Without it the common-space
    adversary is the only force against the leak, and a decoder sharpened by the structure term reads the
    attribute from whatever the adversary lets through (docs/evaluation.md)."""
    return sep_a_of_removed.abs().mean() + sep_b_of_removed.abs().mean()


def discriminator(logit_a: torch.Tensor, logit_b: torch.Tensor) -> torch.Tensor:
    """The latent discriminator's loss: call E_c(a) 'a' (label 1) and E_c(b) 'b' (label 0)."""
    return F.binary_cross_entropy_with_logits(logit_a, torch.ones_like(logit_a)) + F.binary_cross_entropy_with_logits(
        logit_b, torch.zeros_like(logit_b)
    )


def adversarial(logit_a: torch.Tensor, logit_b: torch.Tensor) -> torch.Tensor:
    """The encoder's side of the common-space game: make d label both domains' common codes 'b' (label 0), as the
    published code does, so nothing in E_c tells the domains apart."""
    return F.binary_cross_entropy_with_logits(logit_a, torch.zeros_like(logit_a)) + F.binary_cross_entropy_with_logits(
        logit_b, torch.zeros_like(logit_b)
    )


def discriminator_groups(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The latent discriminator's loss over several groups of common codes (A, B, faces with neither attribute):
    cross-entropy of each code's group."""
    return F.cross_entropy(logits, groups)


def adversarial_towards(logits: torch.Tensor, group: int) -> torch.Tensor:
    """The encoder's side with a third group: make d take A's and B's common codes for the codes of faces with
    neither attribute, the codes on which the attribute-free decode is trained (`--neither-adversary`). The
    two-domain form (`adversarial`) only asks that A's and B's codes look alike, which a code carrying both
    attributes half-way also satisfies."""
    return F.cross_entropy(logits, torch.full((logits.shape[0],), group, dtype=torch.long, device=logits.device))


def generator_terms(codes_a: Codes, codes_b: Codes, recon_a: torch.Tensor, recon_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unweighted non-adversarial terms of one step, by name (for logging and for the weighted sum)."""
    return {
        "recon_a": reconstruction(recon_a, a),
        "recon_b": reconstruction(recon_b, b),
        "zero": zero(codes_b.sep_a, codes_a.sep_b),
    }


# --- the mask-based variant (Mokady, Benaim, Wolf, Bermano, ICLR 2020) ---------------------------------------------
# Its decoder returns (rgb, m) with a mask m in [0, 1]; base_x is the RGB of G(E_c(x), 0, 0), x without attributes.


def composite(rgb: torch.Tensor, mask: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """m * rgb + (1 - m) * base: the generated attribute drawn through its mask over the attribute-free image."""
    return mask * rgb + (1 - mask) * base


def masked_reconstruction(rgb: torch.Tensor, mask: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mask paper's reconstruction: L1(m_a * rgb_a + (1 - m_a) * base_a, a) with (rgb_a, m_a) =
    G(E_c(a), E_sA(a), 0), and likewise for b. The image is only reproduced if the mask covers what base_a lacks."""
    return reconstruction(composite(rgb, mask, base), target)


def mask_reconstruction(rgb: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mask paper's second reconstruction: the attribute decoder's output drawn through its mask over the real
    image must give the image back, L1(m_a * rgb_a + (1 - m_a) * a, a) = mean(m_a * |rgb_a - a|), and likewise for
    b. This is what keeps a mask small without a sparsity term: a pixel left open costs whatever the generated
    image gets wrong there, so the mask opens only where the masked reconstruction needs it (the attribute, which
    the attribute-free base lacks) and the generator draws it right."""
    return reconstruction(composite(rgb, mask, target), target)


def code_cycle(common_t: torch.Tensor, sep_t: torch.Tensor, common_content: torch.Tensor, sep_guide: torch.Tensor) -> torch.Tensor:
    """The mask paper's cycle loss on the codes of a translated image t = G(E_c(content), guide's separate code):
    L1(E_c(t), E_c(content)) + L1(E_s(t), E_s(guide)), E_s the guide's domain's separate encoder."""
    return (common_t - common_content).abs().mean() + (sep_t - sep_guide).abs().mean()


def mask_sparsity(*masks: torch.Tensor) -> torch.Tensor:
    """mean(m) over the masks of the step: an optional extra push towards small masks (off by default; the second
    reconstruction already closes the mask wherever it is not needed)."""
    return torch.stack([m.mean() for m in masks]).mean()
