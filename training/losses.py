"""The losses of Benaim et al. (ICCV 2019), one small function each, written to be checked against the paper.

Notation: a, b are batches of the two domains; E_c, E_sA, E_sB the encoders; G the decoder; d the latent
discriminator (logit that a common code came from domain a). L1 norms are means over all elements, so the loss
weights do not depend on image or code size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F



def reconstruction(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1(G(E_c(a), E_sA(a), 0), a) for domain a, and likewise G(E_c(b), 0, E_sB(b)) against b."""
    return (recon - target).abs().mean()


def structure(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM(recon, target) on [0, 1] images (11x11 Gaussian window), not in the papers (`terms.structure`).
    SSIM is blind to a uniform colour shift, which the L1 reconstruction beside it keeps in check."""
    from pytorch_msssim import ssim  # a training-only package: imported when the term is used

    return 1 - ssim(recon.float() * 0.5 + 0.5, target.float() * 0.5 + 0.5, data_range=1.0)


def zero(sep_a_of_b: torch.Tensor, sep_b_of_a: torch.Tensor) -> torch.Tensor:
    """|E_sA(b)|_1 + |E_sB(a)|_1: a domain's separate encoder says nothing about the other domain's images."""
    return sep_a_of_b.abs().mean() + sep_b_of_a.abs().mean()


def removal_codes(sep_a_of_removed: torch.Tensor, sep_b_of_removed: torch.Tensor) -> torch.Tensor:
    """|E_sA(r)|_1 + |E_sB(r)|_1 for the attribute-free decodes r = G(E_c(x), 0, 0) of both domains, not in the
    papers (`terms.removal`): the zero term teaches each separate encoder to answer 0 on faces without its
    attribute, so an attribute the common code smuggles into r makes them answer."""
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
    """The encoder's side with a third group: make d take the given common codes for those of `group` (the
    faces with neither attribute, `terms.neither_adversarial`)."""
    return F.cross_entropy(logits, torch.full((logits.shape[0],), group, dtype=torch.long, device=logits.device))


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
    """mean(m) over the given masks: a push towards small masks beside the second reconstruction (not in the
    papers)."""
    return torch.stack([m.mean() for m in masks]).mean()
