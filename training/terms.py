"""The training objective as named terms: one declaration each, the only place a term exists.

A term is a small function of the step (`StepInputs`: the batches, the forward pass's named fields, a detached
reader of the separate encoders, the latent discriminator's logits) returning one scalar; its docstring's first
line is its formula. `@term` declares its name, the variants it applies to, the paper it comes from (or none: a
term of our own) and what it reads. A recipe stage gives each term a weight; the step sums `weight * term` over the
terms with a weight above zero. Recipe keys, the `--weight NAME=VALUE` override, `did terms` and the card's record
all come from `TERMS`.

Notation: a, b are the batches of the two domains, n faces with neither attribute (synthetic data only); E_c,
E_sA, E_sB the encoders, G the decoder, d the latent discriminator; c_x, sA_x, sB_x the codes of x. L1 norms are
means, so the weights do not depend on image or code size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import losses
from .passes import MaskPass, PlainPass

BENAIM = "Benaim et al. 2019"
MOKADY = "Mokady et al. 2020"
VARIANTS = ("plain", "mask")


@dataclass
class StepInputs:
    """What a term reads in one step."""

    a: torch.Tensor
    b: torch.Tensor
    neither: torch.Tensor | None
    out: PlainPass | MaskPass
    read: Callable[[str, torch.Tensor], torch.Tensor]  # read("a", x): E_sA(x) through detached weights, float32
    logits: torch.Tensor | None = None  # d on the common codes (a's, b's[, neither's]) after d's own update


@dataclass(frozen=True)
class Term:
    name: str
    fn: Callable[[StepInputs], torch.Tensor]
    variants: tuple[str, ...]
    paper: str | None  # None: not in the papers
    reads: tuple[str, ...]  # the pass's fields (or inputs) it reads
    groups: int = 0  # an adversary: the number of groups its discriminator tells apart

    @property
    def formula(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")

    @property
    def needs_neither(self) -> bool:
        return any(field.startswith("neither") for field in self.reads)


TERMS: dict[str, Term] = {}


def term(name: str, *, variants: tuple[str, ...] = VARIANTS, paper: str | None = None, reads: tuple[str, ...] = (),
         groups: int = 0) -> Callable[[Callable[[StepInputs], torch.Tensor]], Callable[[StepInputs], torch.Tensor]]:
    def declare(fn: Callable[[StepInputs], torch.Tensor]) -> Callable[[StepInputs], torch.Tensor]:
        TERMS[name] = Term(name, fn, variants, paper, reads, groups)
        return fn

    return declare


# --- Benaim et al. 2019 (and, through the pass, the mask paper's masked reconstruction) --------------------------


@term("recon_a", paper=BENAIM, reads=("recon_a",))
def recon_a(s: StepInputs) -> torch.Tensor:
    """L1(G(c_a, sA_a, 0), a); mask variant: L1(m * rgb + (1 - m) * G(c_a, 0, 0), a), (rgb, m) = G(c_a, sA_a, 0).

    The mask variant's image is only reproduced if the mask covers what the attribute-free base lacks."""
    return losses.reconstruction(s.out.recon_a, s.a)


@term("recon_b", paper=BENAIM, reads=("recon_b",))
def recon_b(s: StepInputs) -> torch.Tensor:
    """L1(G(c_b, 0, sB_b), b); mask variant: composited over G(c_b, 0, 0), as recon_a."""
    return losses.reconstruction(s.out.recon_b, s.b)


@term("zero", paper=BENAIM, reads=("codes_a", "codes_b"))
def zero(s: StepInputs) -> torch.Tensor:
    """|E_sA(b)| + |E_sB(a)|: a domain's separate encoder says nothing about the other domain's images."""
    return losses.zero(s.out.codes_b.sep_a.float(), s.out.codes_a.sep_b.float())


@term("adversarial", paper=BENAIM, reads=("codes_a", "codes_b"), groups=2)
def adversarial(s: StepInputs) -> torch.Tensor:
    """BCE(d(c_a), 'b') + BCE(d(c_b), 'b'): the encoder makes d label both domains' common codes 'b'.

    Its discriminator learns BCE(d(c_a), 'a') + BCE(d(c_b), 'b') on detached codes first, each step."""
    n = s.a.shape[0]
    return losses.adversarial(s.logits[:n], s.logits[n : 2 * n])


# --- Mokady et al. 2020 ------------------------------------------------------------------------------------------


@term("mask_recon", variants=("mask",), paper=MOKADY, reads=("rgb_a", "mask_a", "rgb_b", "mask_b"))
def mask_recon(s: StepInputs) -> torch.Tensor:
    """L1(m_a * rgb_a + (1 - m_a) * a, a) + the same for b: the attribute decoder drawn through its mask over the
    real image.

    A pixel left open costs whatever the generated image gets wrong there, so the mask opens only where the masked
    reconstruction needs it (the attribute, which the base lacks): what keeps masks small without a sparsity term."""
    out = s.out
    return losses.mask_reconstruction(out.rgb_a, out.mask_a, s.a) + losses.mask_reconstruction(out.rgb_b, out.mask_b, s.b)


@term("cycle_a", paper=MOKADY, reads=("cycle_a", "codes_a", "codes_b"))
def cycle_a(s: StepInputs) -> torch.Tensor:
    """|E_c(t_a) - c_a| + |E_sB(t_a) - sB_b| for t_a, a's content given b's attribute (targets detached); t_a is
    the composited translation in the mask variant, the decode G(c_a, 0, sB_b) in the plain one.

    The targets are detached: the cycle teaches the translation and its re-encoding; it does not pull the codes of
    the real images towards those of the translations. In the plain variant it asks that a translation keep what
    the common code says (a digit's shape when the domains are whole styles), which the reconstructions alone never
    ask of a decode with another domain's separate code."""
    out = s.out
    return losses.code_cycle(out.cycle_a.common, out.cycle_a.sep_b, out.codes_a.common.float().detach(),
                             out.codes_b.sep_b.float().detach())


@term("cycle_b", paper=MOKADY, reads=("cycle_b", "codes_a", "codes_b"))
def cycle_b(s: StepInputs) -> torch.Tensor:
    """|E_c(t_b) - c_b| + |E_sA(t_b) - sA_a| for t_b, b's content given a's attribute (targets detached)."""
    out = s.out
    return losses.code_cycle(out.cycle_b.common, out.cycle_b.sep_a, out.codes_b.common.float().detach(),
                             out.codes_a.sep_a.float().detach())


# --- terms of our own, not in the papers (docs/research.md says what each did) ----------------------------------


@term("structure", reads=("recon_a", "recon_b"))
def structure(s: StepInputs) -> torch.Tensor:
    """(1 - SSIM(recon_a, a)) + (1 - SSIM(recon_b, b)), 11x11 Gaussian window, beside the L1 reconstructions.

    L1 pays for a feature in proportion to its area, so a blurry decoder learns hair and background long before a
    thin mouth; SSIM compares local structure in every window, so a missing mouth costs as much as a wrong cheek."""
    return losses.structure(s.out.recon_a, s.a) + losses.structure(s.out.recon_b, s.b)


@term("removal", reads=("removed_a", "removed_b"))
def removal(s: StepInputs) -> torch.Tensor:
    """|E_sA(r)| + |E_sB(r)| on the removals r = G(c_x, 0, 0) of both domains, read by detached separate encoders.

    An attribute that the common code smuggles into the attribute-free decode makes the separate encoders answer;
    the gradient reaches the decoder and the common encoder, never the encoders that judge."""
    removed = torch.cat([s.out.removed_a, s.out.removed_b])
    return losses.removal_codes(s.read("a", removed), s.read("b", removed))


@term("masked_removal", variants=("mask",), reads=("mask_a", "mask_b", "base_a", "base_b"))
def masked_removal(s: StepInputs) -> torch.Tensor:
    """The removal term on m_x * G(c_x, 0, 0) + (1 - m_x) * x, the soft removal a mask model serves.

    The base alone is clean whatever the mask does; what survives the served removal is the attribute outside the
    mask, so this charges exactly that and opens the mask over the rest of the attribute."""
    out = s.out
    removed = torch.cat([losses.composite(out.base_a, out.mask_a, s.a), losses.composite(out.base_b, out.mask_b, s.b)])
    return losses.removal_codes(s.read("a", removed), s.read("b", removed))


@term("translated_own", variants=("mask",), reads=("translated_a", "translated_b"))
def translated_own(s: StepInputs) -> torch.Tensor:
    """|E_sA(t_a)| + |E_sB(t_b)| on the composited translations, by detached encoders: the content's own attribute
    is gone from its translation.

    A common code that still carries the content's attribute can draw it back under the other attribute's mask
    (a bearded translation of a smiling face re-drawing the smile inside the beard's mask); the removal terms,
    which see only the decode with both separate codes zero, cannot charge those pixels."""
    return s.read("a", s.out.translated_a).abs().mean() + s.read("b", s.out.translated_b).abs().mean()


@term("translated_guide", variants=("mask",), reads=("translated_a", "translated_b", "codes_a", "codes_b"))
def translated_guide(s: StepInputs) -> torch.Tensor:
    """|E_sB(t_a) - sB_b| + |E_sA(t_b) - sA_a| on the composited translations, readers and targets detached: the
    guide's attribute is drawn as strongly as its own reconstruction draws it.

    The code cycle asks the same through encoders it also trains, which learn to read the code out of a faint
    drawing; read by encoders that only the reconstructions train, a translation carries the guide's code only
    when it draws the attribute fully."""
    out = s.out
    return ((s.read("b", out.translated_a) - out.codes_b.sep_b.detach().float()).abs().mean()
            + (s.read("a", out.translated_b) - out.codes_a.sep_a.detach().float()).abs().mean())


@term("mask_sparsity", variants=("mask",), reads=("mask_a", "mask_b", "trans_mask_a", "trans_mask_b"))
def mask_sparsity(s: StepInputs) -> torch.Tensor:
    """mean(m) over the reconstructions' masks and the translations' masks: a push towards small masks."""
    out = s.out
    return losses.mask_sparsity(out.mask_a, out.mask_b, torch.cat([out.trans_mask_a, out.trans_mask_b]))


@term("neither", reads=("neither_decoded",))
def neither(s: StepInputs) -> torch.Tensor:
    """L1(G(c_n, 0, 0), n) on faces with neither attribute: trains the attribute-free decode that removal uses and
    the other terms never show a target for."""
    return losses.reconstruction(s.out.neither.decoded, s.neither)


@term("neither_structure", reads=("neither_decoded",))
def neither_structure(s: StepInputs) -> torch.Tensor:
    """1 - SSIM(G(c_n, 0, 0), n): the structure term on the faces with neither attribute."""
    return losses.structure(s.out.neither.decoded, s.neither)


@term("neither_zero", reads=("neither_codes",))
def neither_zero(s: StepInputs) -> torch.Tensor:
    """|E_sA(n)| + |E_sB(n)|: the zero term on faces with neither attribute."""
    codes = s.out.neither.codes
    return losses.zero(codes.sep_a.float(), codes.sep_b.float())


@term("neither_adversarial", reads=("codes_a", "codes_b", "neither_codes"), groups=3)
def neither_adversarial(s: StepInputs) -> torch.Tensor:
    """CE(d(c_a), neither) + CE(d(c_b), neither), d telling three groups apart: a's, b's and the neither faces'
    common codes. Replaces `adversarial` where it has a weight.

    The two-domain adversary only asks that A's and B's codes look alike, which a code carrying both attributes
    half-way also satisfies; this one asks that they look like the codes of faces with neither attribute, the
    codes the attribute-free decode is trained on."""
    n = s.a.shape[0]
    return losses.adversarial_towards(s.logits[:n], 2) + losses.adversarial_towards(s.logits[n : 2 * n], 2)


def discriminator_loss(adversary: Term, logits: torch.Tensor, n: int) -> torch.Tensor:
    """The latent discriminator's own loss for the adversary in use: the true group of each common code."""
    if adversary.groups == 3:
        groups = torch.arange(3, device=logits.device).repeat_interleave(n)
        return losses.discriminator_groups(logits, groups)
    return losses.discriminator(logits[:n], logits[n : 2 * n])


def check_weights(weights: dict[str, float], variant: str, where: str = "") -> None:
    """Refuse unknown terms, negative weights, terms of the other variant and two adversaries at once."""
    at = f"{where}: " if where else ""
    for name, weight in weights.items():
        if name not in TERMS:
            raise ValueError(f"{at}unknown loss term {name!r}; the terms are {', '.join(TERMS)}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"{at}the weight of {name} must be a number >= 0, not {weight!r}")
        if weight and variant not in TERMS[name].variants:
            raise ValueError(f"{at}{name} applies to the {' and '.join(TERMS[name].variants)} variant, "
                             f"this stage trains {variant!r}")
    if weights.get("adversarial") and weights.get("neither_adversarial"):
        raise ValueError(f"{at}adversarial and neither_adversarial are two forms of the one latent adversary: "
                         "give only one a weight")


def adversary_of(weights: dict[str, float]) -> Term:
    """The latent adversary a stage trains: neither_adversarial where it has a weight, else the papers' (whose
    discriminator is trained and logged even at weight 0)."""
    return TERMS["neither_adversarial" if weights.get("neither_adversarial") else "adversarial"]


def active(weights: dict[str, float]) -> list[Term]:
    """The generator's terms with a weight above zero, in declaration order (the adversary excluded)."""
    return [t for name, t in TERMS.items() if weights.get(name) and not t.groups]
