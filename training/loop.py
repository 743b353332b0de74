"""The training loop: one process, or one process per GPU/CPU under torchrun (DistributedDataParallel).

Each step: (1) the latent discriminator learns to tell E_c(a) from E_c(b); (2) the encoders and decoder minimise
recon_weight * recon_a + recon_weight_b * recon_b + zero_weight * zero + adv_weight * adversarial, and for the mask
variant also the mask reconstructions, the code cycles and the mask sparsity, plus the optional terms of our own
(structure, removal, neither; see `Trainer.step`). Rank 0 writes:
`log.jsonl`, sample grids, the inference checkpoint (`model.safetensors` + `model.json`) and `train_state.pt`,
from which `--resume` continues exactly (data batches are a pure function of the step, so nothing is replayed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import checkpoint
from models.config import ModelConfig, preset
from models.disentangler import Codes, Disentangler
from models.images import save_grid
from models.networks import LatentDiscriminator

from . import losses
from .data import PairSource
from .figures import training_sample

log = logging.getLogger("did.train")

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


# Loss weights a run takes unless told otherwise: the published values of each variant's paper (Benaim et al.
# for plain, Mokady et al.'s glasses settings for mask). mask_weight, an extra sparsity term of our own, is off:
# the mask paper's public code has none, because its second reconstruction (`losses.mask_reconstruction`, the
# attribute decoder composited over the real image) already charges an open mask for every pixel the generator
# gets wrong. An earlier form of that loss here (the raw generator output, no mask) left the mask free, and a
# sparsity weight of 1.0 then shut every mask (mask IoU 0 on a 128 px run): see docs/evaluation.md.
WEIGHT_DEFAULTS: dict[str, dict[str, float]] = {
    "plain": dict(recon_weight=1.0, recon_weight_b=1.0, adv_weight=0.001, mask_recon_weight=0.0, cycle_weight_a=0.0,
                  cycle_weight_b=0.0, mask_weight=0.0),
    "mask": dict(recon_weight=7.0, recon_weight_b=5.0, adv_weight=0.005, mask_recon_weight=0.7, cycle_weight_a=0.0,
                 cycle_weight_b=0.001, mask_weight=0.0),
}


@dataclass
class TrainConfig:
    """Every knob of a run; the published defaults (Benaim et al.) unless noted. Loss weights left at None take
    the variant's defaults (WEIGHT_DEFAULTS) when the config is made."""

    out: str = "runs/did"
    steps: int = 100_000
    max_minutes: float = 0.0  # stop (and save) after this much training time even if `steps` is not reached; 0: no limit
    batch_size: int = 32  # per process, per domain
    width: str = "paper"  # models.config.PRESETS
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    variant: str = "plain"  # models.config.VARIANTS: "mask" adds the mask head and its losses
    recon_weight: float | None = None  # domain a's reconstruction (plain: both domains' unless recon_weight_b)
    recon_weight_b: float | None = None  # domain b's reconstruction (plain default: recon_weight)
    zero_weight: float = 1.0
    adv_weight: float | None = None
    mask_recon_weight: float | None = None  # mask variant: the attribute decoder over the real image, each domain
    cycle_weight_a: float | None = None  # mask variant: code cycle of a's images given b's attribute
    cycle_weight_b: float | None = None  # mask variant: code cycle of b's images given a's attribute
    mask_weight: float | None = None  # mask variant: mean of the masks (extra sparsity; default 0)
    structure_weight: float = 0.0  # W * (1 - SSIM) added to each reconstruction (not in the papers; 0: L1 only)
    removal_weight: float = 0.0  # W * |E_s(G(E_c(x), 0, 0))|: the removal re-encodes to no attribute (ours)
    masked_removal_weight: float = 0.0  # mask variant: W * |E_s(m G(E_c(x), 0, 0) + (1 - m) x)|, on the removal itself (ours)
    translated_own_weight: float = 0.0  # mask variant: W * |own E_s(translation)|, the content's attribute gone (ours)
    translated_guide_weight: float = 0.0  # mask variant: W * |guide's E_s(translation) - s|, its attribute drawn (ours)
    common_noise: float = 0.0  # decode from E_c(x) + noise of this std relative to the code's RMS (ours; 0: off)
    neither_weight: float = 0.0  # W * L1(G(E_c(n), 0, 0), n) on faces n with neither attribute (ours; 0: off)
    neither_adversary: bool = False  # the latent adversary over three groups, A and B pushed towards neither (ours)
    clip: float = 5.0
    disc_steps: int = 1  # latent-discriminator updates per generator update (the published code: 1)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 5000
    save_dtype: str = "float32"
    num_workers: int = 2
    resume: bool = False
    init: str = ""  # start from this inference checkpoint's weights (fine-tuning); ignored when resuming
    freeze_encoders: bool = False  # train the decoder alone on the codes of the (--init) encoders
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"sep_channels": 32}

    def __post_init__(self) -> None:
        if self.variant not in WEIGHT_DEFAULTS:
            raise ValueError(f"variant must be one of {sorted(WEIGHT_DEFAULTS)}, not {self.variant!r}")
        for name in ("structure_weight", "removal_weight", "masked_removal_weight", "translated_own_weight",
                     "translated_guide_weight", "common_noise", "neither_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        # the terms of our own that only a mask model's pass computes, and what each charges there
        for name, charged in (("masked_removal_weight", "removal"), ("translated_own_weight", "translations"),
                              ("translated_guide_weight", "translations")):
            if getattr(self, name) and self.variant != "mask":
                raise ValueError(f"{name} charges a mask model's {charged}: it needs variant 'mask'")
        if self.neither_adversary and not self.neither_weight:
            raise ValueError("neither_adversary needs the faces of neither attribute that neither_weight > 0 brings")
        if self.disc_steps < 1:
            raise ValueError(f"disc_steps must be at least 1, not {self.disc_steps}")
        defaults = dict(WEIGHT_DEFAULTS[self.variant])
        if self.variant == "plain" and self.recon_weight is not None:
            defaults["recon_weight_b"] = self.recon_weight  # plain: one --recon-weight sets both domains
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Dist:
    """This process's place in the job (world_size 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job if launched by one (NCCL on CUDA, gloo on CPU) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but PyTorch sees no CUDA device")
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        device = torch.device("cuda", d.local_rank) if device_arg in ("auto", "cuda") else torch.device(device_arg)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > 1:  # share the cores between the processes on this machine instead of oversubscribing
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return d, device


class MaskPass(NamedTuple):
    """One forward pass of the mask variant, n images per domain; rgb/mask rows in blocks of n: reconstructions
    G(c_a, sA_a, 0), G(c_b, 0, sB_b); bases G(c_a, 0, 0), G(c_b, 0, 0); translations G(c_a, 0, sB_b) (a with b's
    attribute), G(c_b, sA_a, 0) (b with a's). `translated` holds those two translations composited over their
    content's base, and `cycle` their codes."""

    codes_a: Codes
    codes_b: Codes
    rgb: torch.Tensor  # (6n, 3, S, S)
    mask: torch.Tensor  # (6n, 1, S, S)
    translated: torch.Tensor  # (2n, 3, S, S): translated a, translated b
    cycle: Codes  # (2n, ...): E(translated a), E(translated b)
    neither: "NeitherPass | None" = None


class PlainPass(NamedTuple):
    """One forward pass of the plain variant: the codes, the two reconstructions and, when the removal term is on,
    the attribute-free decodes G(c_a, 0, 0), G(c_b, 0, 0) as one (2n, ...) block (else None)."""

    codes_a: Codes
    codes_b: Codes
    recon_a: torch.Tensor
    recon_b: torch.Tensor
    removed: torch.Tensor | None
    neither: "NeitherPass | None" = None


class NeitherPass(NamedTuple):
    """Faces with neither attribute (`--neither-weight`): their codes and G(E_c(n), 0, 0), the RGB only for mask
    models (the attribute-free decode is the base their masks composite over)."""

    codes: Codes
    decoded: torch.Tensor


def noisy_common(common: torch.Tensor, sigma: float) -> torch.Tensor:
    """The common code with Gaussian noise of std `sigma` times each image's RMS code value, for training decodes.

    An information bottleneck on the common code (as in LORD, Gabbay and Hoshen, ICLR 2020), not in the papers. The
    latent adversary stops differences between the domains' common codes that it can see; the decoder can still
    read an attribute out of differences too small for it (docs/evaluation.md: the bundled models keep the glasses
    through removal). Noise drowns small differences, so the decoder has to take the attribute from the separate
    code, whose small values are not noised. The noise follows each image's RMS (detached) because the decoder
    normalises its first layer per image: only the code's relative size matters, so an absolute noise level could be
    escaped by scaling the code up. Inference decodes the clean code."""
    if not sigma:
        return common
    rms = common.detach().float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().to(common.dtype)
    return common + sigma * rms * torch.randn_like(common)


class _Generator(nn.Module):
    """The encoders and decoder as one forward pass, so DistributedDataParallel sees every parameter used.

    Both domains go through each encoder and the decoder as one concatenated batch (every layer is per-sample, so
    this equals two passes and runs faster). The mask variant decodes all six of its images in one call and
    re-encodes its translations in a second encoder call."""

    def __init__(self, model: Disentangler, removal: bool = False, common_noise: float = 0.0):
        super().__init__()
        self.model = model
        self.removal = removal  # plain: also decode G(c, 0, 0) for the removal term
        self.common_noise = common_noise  # decodes see noisy_common(E_c(x)); the adversary sees the clean code

    def forward(self, a: torch.Tensor, b: torch.Tensor, neither: torch.Tensor | None = None) -> PlainPass | MaskPass:
        n = a.shape[0]
        codes = self.model.encode(torch.cat([a, b]) if neither is None else torch.cat([a, b, neither]))
        codes_a, codes_b = codes.index(slice(0, n)), codes.index(slice(n, 2 * n))
        zeros = torch.zeros_like(codes_a.sep_a)
        extra = None
        if neither is not None:  # G(c_n, 0, 0): the generator's RGB, which for a mask model is its base
            codes_n = codes.index(slice(2 * n, None))
            extra = NeitherPass(codes_n, self.model.decode_parts(noisy_common(codes_n.common, self.common_noise))[0])
            codes = codes.index(slice(0, 2 * n))
        if self.model.config.has_mask:
            return self._mask_pass(codes_a, codes_b, zeros)._replace(neither=extra)
        # Reconstruct a with its own separate code and b's code zeroed, and b the other way round; with the removal
        # term, the attribute-free decodes of both domains ride in the same decoder call.
        common = noisy_common(codes.common, self.common_noise)
        sep_a, sep_b = torch.cat([codes_a.sep_a, zeros]), torch.cat([zeros, codes_b.sep_b])
        if self.removal:
            none = torch.zeros_like(sep_a)
            common, sep_a, sep_b = torch.cat([common, common]), torch.cat([sep_a, none]), torch.cat([sep_b, none])
        out = self.model.decode(common, sep_a, sep_b)
        return PlainPass(codes_a, codes_b, out[:n], out[n : 2 * n], out[2 * n :] if self.removal else None, extra)

    def _mask_pass(self, codes_a: Codes, codes_b: Codes, zeros: torch.Tensor) -> MaskPass:
        n = zeros.shape[0]
        common = noisy_common(torch.cat([codes_a.common, codes_b.common]), self.common_noise)
        ca, cb, sa, sb = common[:n], common[n:], codes_a.sep_a, codes_b.sep_b
        rgb, mask = self.model.decode_parts(
            torch.cat([ca, cb, ca, cb, ca, cb]),
            torch.cat([sa, zeros, zeros, zeros, zeros, sa]),
            torch.cat([zeros, sb, zeros, zeros, sb, zeros]),
        )
        # Translations composited over their content's attribute-free base, as `decode` renders them.
        translated = mask[4 * n :] * rgb[4 * n :] + (1 - mask[4 * n :]) * rgb[2 * n : 4 * n]
        return MaskPass(codes_a, codes_b, rgb, mask, translated, self.model.encode(translated))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log lines written after the step we resume from, so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


METRICS = ("recon_a", "recon_b", "zero", "adv", "disc", "loss")  # plain models
MASK_METRICS = ("recon_a", "recon_b", "mask_recon_a", "mask_recon_b", "cycle_a", "cycle_b", "mask", "zero", "adv", "disc", "loss")
VARIANT_METRICS = {"plain": METRICS, "mask": MASK_METRICS}
STRUCTURE_METRICS = ("structure_a", "structure_b")  # logged when structure_weight > 0
REMOVAL_METRICS = ("removal",)  # logged when removal_weight > 0
MASKED_REMOVAL_METRICS = ("masked_removal",)  # logged when masked_removal_weight > 0
TRANSLATED_OWN_METRICS = ("translated_own",)  # logged when translated_own_weight > 0
TRANSLATED_GUIDE_METRICS = ("translated_guide",)  # logged when translated_guide_weight > 0
NEITHER_METRICS = ("neither", "neither_zero")  # logged when neither_weight > 0


def _time_is_up(deadline: float, device: torch.device, world_size: int) -> bool:
    """Whether the time budget is spent; under torchrun rank 0 decides for all, so every rank stops at the same step."""
    if deadline == math.inf:
        return False
    flag = torch.tensor([time.monotonic() >= deadline], dtype=torch.int32, device=device)
    if world_size > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


class Trainer:
    """The nets, their optimisers and one training step; `train()` adds data, logging and checkpoints around it,
    and the training benchmark times `step` alone."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, world_size: int = 1):
        self.cfg, self.device = cfg, device
        self.metrics = VARIANT_METRICS[model_cfg.variant]
        if cfg.structure_weight:
            self.metrics = self.metrics + STRUCTURE_METRICS
        # the weighted terms of the generator's loss (adv is added after the discriminator's update)
        self.weights = {"recon_a": cfg.recon_weight, "recon_b": cfg.recon_weight_b, "zero": cfg.zero_weight}
        if model_cfg.has_mask:
            self.weights |= {"mask_recon_a": cfg.mask_recon_weight, "mask_recon_b": cfg.mask_recon_weight,
                             "cycle_a": cfg.cycle_weight_a, "cycle_b": cfg.cycle_weight_b, "mask": cfg.mask_weight}
        if cfg.structure_weight:
            self.weights |= {"structure_a": cfg.structure_weight, "structure_b": cfg.structure_weight}
        if cfg.removal_weight:
            self.metrics = self.metrics + REMOVAL_METRICS
            self.weights |= {"removal": cfg.removal_weight}
        if cfg.masked_removal_weight:
            self.metrics = self.metrics + MASKED_REMOVAL_METRICS
            self.weights |= {"masked_removal": cfg.masked_removal_weight}
        if cfg.translated_own_weight:
            self.metrics = self.metrics + TRANSLATED_OWN_METRICS
            self.weights |= {"translated_own": cfg.translated_own_weight}
        if cfg.translated_guide_weight:
            self.metrics = self.metrics + TRANSLATED_GUIDE_METRICS
            self.weights |= {"translated_guide": cfg.translated_guide_weight}
        if cfg.neither_weight:
            # the attribute-free decode of faces without either attribute must give them back (with the structure
            # term when it is on), and both separate encoders must answer zero on them, as the zero term asks
            self.metrics = self.metrics + NEITHER_METRICS
            self.weights |= {"neither": cfg.neither_weight, "neither_zero": cfg.zero_weight}
        self.model = Disentangler(model_cfg).to(device).train()
        self.disc = LatentDiscriminator(model_cfg, groups=3 if cfg.neither_adversary else 2).to(device).train()
        if cfg.freeze_encoders:
            # The codes stay those of the starting checkpoint: a mask head trained on them cannot pull an attribute
            # into the common code (see docs/evaluation.md, the mask model), and the zero and adversarial terms,
            # which reach only the encoders, become constants.
            for encoder in (self.model.enc_common, self.model.enc_a, self.model.enc_b):
                encoder.requires_grad_(False)
        self.opt_g = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.gen: nn.Module = _Generator(self.model, removal=bool(cfg.removal_weight), common_noise=cfg.common_noise)
        self.disc_ddp: nn.Module = self.disc
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.gen = DistributedDataParallel(self.gen, device_ids=ids)
            self.disc_ddp = DistributedDataParallel(self.disc, device_ids=ids)
        use_amp = device.type == "cuda" and cfg.amp
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    def step(self, a: torch.Tensor, b: torch.Tensor, neither: torch.Tensor | None = None) -> torch.Tensor:
        """One step on a batch of each domain (and, with `neither_weight`, a batch of faces with neither attribute);
        returns the variant's metrics (`self.metrics`, METRICS or MASK_METRICS order) as one detached tensor (no
        host sync)."""
        cfg, n = self.cfg, a.shape[0]
        if cfg.neither_weight and neither is None:
            raise ValueError("neither_weight is on: each step needs a batch of faces with neither attribute")
        with self.autocast():
            out = self.gen(a, b, neither if cfg.neither_weight else None)
        if isinstance(out, MaskPass):
            codes_a, codes_b = out.codes_a, out.codes_b
            terms = self._mask_terms(out, a, b)
            rgb, mask = out.rgb.float(), out.mask.float()  # the pass may be bf16
            if cfg.removal_weight:  # the attribute-free bases G(c_a, 0, 0), G(c_b, 0, 0) of the pass
                terms["removal"] = self._removal_term(out.rgb[2 * n : 4 * n])
            if cfg.masked_removal_weight:
                terms["masked_removal"] = self._removal_term(self._masked_removals(rgb, mask, a, b))
            if cfg.translated_own_weight:
                terms["translated_own"] = self._translated_own_term(out.translated)
            if cfg.translated_guide_weight:
                terms["translated_guide"] = self._translated_guide_term(out.translated, codes_a.sep_a, codes_b.sep_b)
            if cfg.structure_weight:  # on the masked reconstructions, composited as in `_mask_terms`
                recon_a = losses.composite(rgb[:n], mask[:n], rgb[2 * n : 3 * n])
                recon_b = losses.composite(rgb[n : 2 * n], mask[n : 2 * n], rgb[3 * n : 4 * n])
        else:
            codes_a, codes_b, recon_a, recon_b = out.codes_a, out.codes_b, out.recon_a, out.recon_b
            terms = losses.generator_terms(codes_a, codes_b, recon_a.float(), recon_b.float(), a, b)
            if out.removed is not None:
                terms["removal"] = self._removal_term(out.removed)
        if cfg.structure_weight:
            terms["structure_a"], terms["structure_b"] = losses.structure(recon_a, a), losses.structure(recon_b, b)
        if out.neither is not None:
            decoded = out.neither.decoded.float()
            terms["neither"] = losses.reconstruction(decoded, neither)
            if cfg.structure_weight:
                terms["neither"] = terms["neither"] + cfg.structure_weight * losses.structure(decoded, neither)
            terms["neither_zero"] = losses.zero(out.neither.codes.sep_a.float(), out.neither.codes.sep_b.float())
        common = torch.cat([codes_a.common, codes_b.common]).float()
        if cfg.neither_adversary:  # the third group: codes of faces with neither attribute
            common = torch.cat([common, out.neither.codes.common.float()])
            groups = torch.arange(3, device=common.device).repeat_interleave(n)

        # (1) the latent discriminator learns to tell E_c(a) from E_c(b), on codes detached from the encoder;
        # `disc_steps` updates on the same codes let it keep up with an encoder that hides the domain in ever
        # smaller differences (it is a small MLP, so extra updates cost little beside the encoder/decoder pass).
        for _ in range(cfg.disc_steps):
            logits = self.disc_ddp(common.detach())
            loss_d = losses.discriminator_groups(logits, groups) if cfg.neither_adversary else \
                losses.discriminator(logits[:n], logits[n:])
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.clip)
            self.opt_d.step()

        # (2) encoders + decoder. The adversarial term reads the updated discriminator through detached copies of
        # its parameters, so gradients reach the encoder only and DDP's hooks on the discriminator stay untouched.
        adv_logits = functional_call(self.disc, {k: v.detach() for k, v in self.disc.named_parameters()}, (common,))
        if cfg.neither_adversary:  # A's and B's codes towards the neither group, each domain's mean as below
            terms["adv"] = losses.adversarial_towards(adv_logits[:n], 2) + losses.adversarial_towards(adv_logits[n : 2 * n], 2)
        else:
            terms["adv"] = losses.adversarial(adv_logits[:n], adv_logits[n:])
        loss_g = sum(w * terms[k] for k, w in self.weights.items()) + cfg.adv_weight * terms["adv"]
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.opt_g.step()
        terms["disc"], terms["loss"] = loss_d, loss_g
        return torch.stack([terms[k] for k in self.metrics]).detach().float()

    def _removal_term(self, removed: torch.Tensor) -> torch.Tensor:
        """losses.removal_codes on G(c, 0, 0) of both domains, read by the separate encoders through detached copies
        of their parameters: they stay detectors trained by the reconstructions and the zero term alone, and the
        gradient reaches the decoder and, through c, the common encoder."""
        codes = [self._read_detached(enc, removed) for enc in (self.model.enc_a, self.model.enc_b)]
        return losses.removal_codes(codes[0], codes[1])

    def _read_detached(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`encoder(x)` in float32 through detached copies of its parameters: the encoder judges x without being
        trained by the judgement; the gradient flows back into x alone."""
        with self.autocast():
            code = functional_call(encoder, {k: v.detach() for k, v in encoder.named_parameters()}, (x,))
        return code.float()

    def _translated_own_term(self, translated: torch.Tensor) -> torch.Tensor:
        """|E_sA(t_a)|_1 + |E_sB(t_b)|_1 on the pass's composited translations (`MaskPass.translated`; t_a: a's
        content with b's attribute, t_b: b's with a's), read by detached separate encoders as in `_removal_term`:
        the content's own attribute must be gone from its translation.

        The removal terms charge only the decode with both separate codes zero. A common code that still carries
        the content's attribute is then free to draw it back whenever the other separate code is on, inside the
        mask that code opens (a bearded beard_smile translation of a smiling face re-draws the smile within the
        beard's mask); this term charges exactly those pixels. Its gradient reaches the decoder, the common code and
        the guide's separate code that drew the translation, not the encoders as readers."""
        n = translated.shape[0] // 2
        own_a = self._read_detached(self.model.enc_a, translated[:n])
        own_b = self._read_detached(self.model.enc_b, translated[n:])
        return own_a.abs().mean() + own_b.abs().mean()

    def _translated_guide_term(self, translated: torch.Tensor, sep_a: torch.Tensor, sep_b: torch.Tensor) -> torch.Tensor:
        """|E_sB(t_a) - s_B| + |E_sA(t_b) - s_A| (means) on the pass's composited translations, read by detached
        separate encoders; the targets, the guides' own codes, are detached too.

        The mask paper's cycle loss asks the same of the re-encoded translation, but through encoders it also
        trains: they learn to read the guide's code out of a faint drawing, and the cycle is met by a translation
        whose mask barely opens (smile_glasses: small smiles pasted onto glasses faces stay nearly closed). Read by
        encoders that only the reconstructions train, a translation carries the guide's code only when it draws the
        attribute as strongly as the guide's own reconstruction does; the gradient reaches the decoder, its mask,
        the common code and the separate code that drew the translation."""
        n = translated.shape[0] // 2
        guide_b = self._read_detached(self.model.enc_b, translated[:n])  # a's content with b's attribute
        guide_a = self._read_detached(self.model.enc_a, translated[n:])
        return (guide_b - sep_b.detach().float()).abs().mean() + (guide_a - sep_a.detach().float()).abs().mean()

    @staticmethod
    def _masked_removals(rgb: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The removals a mask model serves, in their soft form: each image's own attribute mask m (of its
        reconstruction) blends the attribute-free base in, m * G(c, 0, 0) + (1 - m) * x; (2n, ...), a then b, from
        a MaskPass's rgb and mask rows.

        The removal term on the base alone cannot see a mask that covers only part of the attribute: the base is
        clean, and what survives removal is the attribute outside the mask. Read by the separate encoders, the
        composite charges exactly that, so the gradient opens the mask over the rest of the attribute (through the
        decoder and the separate code that draws the mask; the encoders reading the composite stay detached)."""
        n = a.shape[0]
        return torch.cat([losses.composite(rgb[2 * n : 3 * n], mask[:n], a),
                          losses.composite(rgb[3 * n : 4 * n], mask[n : 2 * n], b)])

    @staticmethod
    def _mask_terms(out: MaskPass, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted non-adversarial terms of the mask variant, computed in float32 (the pass may be bf16)."""
        n = a.shape[0]
        rgb, mask = out.rgb.float(), out.mask.float()
        block = lambda i: slice(i * n, (i + 1) * n)  # noqa: E731  the i-th block of n rows (see MaskPass)
        cyc = Codes(*(t.float() for t in out.cycle))
        ca, cb = out.codes_a.common.float(), out.codes_b.common.float()
        sa, sb = out.codes_a.sep_a.float(), out.codes_b.sep_b.float()
        return {
            "recon_a": losses.masked_reconstruction(rgb[block(0)], mask[block(0)], rgb[block(2)], a),
            "recon_b": losses.masked_reconstruction(rgb[block(1)], mask[block(1)], rgb[block(3)], b),
            "mask_recon_a": losses.mask_reconstruction(rgb[block(0)], mask[block(0)], a),
            "mask_recon_b": losses.mask_reconstruction(rgb[block(1)], mask[block(1)], b),
            # the targets are detached: the cycle teaches the translation and its re-encoding, it does not pull
            # the codes of the real images towards those of the translations
            "cycle_a": losses.code_cycle(cyc.common[:n], cyc.sep_b[:n], ca.detach(), sb.detach()),
            "cycle_b": losses.code_cycle(cyc.common[n:], cyc.sep_a[n:], cb.detach(), sa.detach()),
            "mask": losses.mask_sparsity(mask[block(0)], mask[block(1)], mask[4 * n :]),
            "zero": losses.zero(out.codes_b.sep_a.float(), out.codes_a.sep_b.float()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore nets and optimisers. The optimisers keep their moments but take this run's learning rate and
        betas: Adam's own load_state_dict would restore the saved ones, and a resumed run given a new --lr would
        silently train at the old rate while its card recorded the new one."""
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        for opt, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            opt.load_state_dict(state[key])
            for group in opt.param_groups:
                group["lr"], group["betas"] = self.cfg.lr, tuple(self.cfg.betas)


def initialise_from(model: Disentangler, path: str | Path) -> dict[str, Any]:
    """Copy a checkpoint's weights into a fresh model, the start of a fine-tuning run; returns what the card records.

    The checkpoint must have the same sizes (image size, widths, codes); its domain names and variant may differ. A
    plain checkpoint starts a mask model: its 3-channel output layer fills the RGB channels of the 4-channel one and
    the mask channel keeps its fresh initialisation, so the mask model begins with everything the plain one learned
    and only the mask to learn. The latent discriminator and the optimisers always start fresh.
    """
    source = checkpoint.load(path)
    sizes = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("variant", "domain_a", "domain_b")}  # noqa: E731
    mine, theirs = sizes(model.config), sizes(source.config)
    if mine != theirs:
        diff = ", ".join(f"{k} {theirs[k]} (this run: {mine[k]})" for k in mine if mine[k] != theirs[k])
        raise ValueError(f"--init {path}: the checkpoint's nets have other sizes: {diff}")
    target = model.state_dict()
    with torch.no_grad():
        for name, value in source.state_dict().items():
            if name not in target:
                raise ValueError(f"--init {path}: the checkpoint has a tensor this model lacks ({name})")
            dest = target[name]
            rgb = dest[:3] if dest.dim() == 1 else dest[:, :3]  # output channels: dim 1 of a transposed conv's weight
            if dest.shape == value.shape:
                dest.copy_(value)
            elif name.startswith("decoder.to_rgb.") and rgb.shape == value.shape:
                rgb.copy_(value)
            else:
                raise ValueError(f"--init {path}: {name} has shape {tuple(value.shape)}, this model needs {tuple(dest.shape)}")
    card = source.card
    return {"path": str(path), "name": card.get("name"), "variant": source.config.variant,
            "sha256": card["tensors"]["sha256"], "steps": card.get("training", {}).get("steps")}


def build_model_config(cfg: TrainConfig, source: PairSource) -> ModelConfig:
    """The nets a run trains: the width preset at the data's size, named after the data's domains."""
    return preset(cfg.width, image_size=source.image_size, domain_a=source.domains[0], domain_b=source.domains[1],
                  variant=cfg.variant, **cfg.model_overrides)


def train(cfg: TrainConfig, source: PairSource) -> Path:
    """Run (or resume) training; returns the path of the final model card. Every rank calls this under torchrun."""
    if cfg.neither_weight and not hasattr(source, "neither_batches"):
        raise ValueError(f"--neither-weight needs faces with neither attribute, which only the synthetic benchmark "
                         f"renders; {source.describe().get('kind', 'this data')} has none")
    d, device = setup_distributed(cfg.device)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + d.rank)

    model_cfg = build_model_config(cfg, source)
    trainer = Trainer(cfg, model_cfg, device, d.world_size)
    model = trainer.model

    step = 0
    state_path = out / STATE_FILE
    if cfg.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        state = torch.load(state_path, map_location=device, weights_only=True)
        saved_cfg = ModelConfig.from_dict(state["model_config"])
        if saved_cfg != model_cfg:
            raise ValueError(f"--resume: {state_path} was trained with {saved_cfg}, this run builds {model_cfg}")
        try:
            trainer.load_state_dict(state)
        except RuntimeError as e:  # tensors of another layout, e.g. the spectrally normalised discriminator of old runs
            first = str(e).splitlines()[0]
            raise ValueError(f"--resume: {state_path} holds networks of another layout and cannot be resumed ({first}); "
                             f"start a new run, or a new --out with --init {out / 'model'} to keep its weights") from None
        step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"][d.rank % len(state["rng_cpu"])].cpu())
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"][d.rank % len(state["rng_cuda"])].cpu())
        if d.main:
            _truncate_log(out / LOG_FILE, step)
            log.info("resumed %s at step %d", out, step)

    training_meta = {
        "data": source.describe(),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "resume", "progress", "init")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": d.world_size,
    }
    if cfg.resume:  # the weights come from the state; its record of where they started carries over
        init = state.get("init")
    elif cfg.init:  # every rank copies the same weights, so the DDP replicas start equal
        init = initialise_from(model, cfg.init)
        if d.main:
            log.info("initialised from %s (%s, %s steps)", cfg.init, init["variant"], init["steps"])
    else:
        init = None
    if init:
        training_meta["init"] = init

    def save_all(at_step: int) -> Path | None:
        """Rank 0: the inference checkpoint, then the training state (each written atomically)."""
        if not d.main:
            return None
        card = checkpoint.save(model, out / "model", training={**training_meta, "steps": at_step}, dtype=cfg.save_dtype)
        rng_cpu = [torch.get_rng_state()]
        rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        _atomic_torch_save(
            {
                "step": at_step,
                "model_config": model_cfg.to_dict(),
                "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()},
                **trainer.state_dict(),
                "rng_cpu": rng_cpu,
                "rng_cuda": rng_cuda,
                "init": init,
            },
            state_path,
        )
        return card

    # Fixed faces for the sample grids: the same ones at every sample step (from a seed of their own).
    sample_a, sample_b = next(iter(source.batches(6, seed=cfg.seed + 1_000_003, device=device, num_workers=0)))

    def write_sample(at_step: int) -> None:
        if not d.main:
            return
        model.eval()
        save_grid(training_sample(model, sample_a, sample_b)[None], out / "samples" / f"step_{at_step:07d}.png")
        model.train()

    data = source.batches(cfg.batch_size, seed=cfg.seed, start_step=step, rank=d.rank, world_size=d.world_size, device=device,
                          num_workers=cfg.num_workers)
    neither = source.neither_batches(cfg.batch_size, seed=cfg.seed, start_step=step, rank=d.rank,  # type: ignore[attr-defined]
                                     world_size=d.world_size, device=device) if cfg.neither_weight else None
    names = trainer.metrics
    totals = torch.zeros(len(names), device=device)
    window_steps, window_start = 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (d.main and cfg.progress), unit="step", dynamic_ncols=True)
    log_file = open(out / LOG_FILE, "a") if d.main else None
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    try:
        while step < cfg.steps:
            if step % cfg.log_every == 0 and _time_is_up(deadline, device, d.world_size):
                log.info("--max-minutes %.1f reached at step %d of %d; saving", cfg.max_minutes, step, cfg.steps)
                break
            a, b = next(data)
            metrics = trainer.step(a, b, next(neither) if neither is not None else None)
            step += 1
            window_steps += 1
            totals += metrics
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                if d.world_size > 1:
                    dist.all_reduce(totals)
                    totals /= d.world_size
                elapsed = time.perf_counter() - window_start
                means = (totals / window_steps).tolist()
                if any(not math.isfinite(v) for v in means):
                    raise FloatingPointError(f"loss is not finite at step {step}: {dict(zip(names, means))}")
                record = {"step": step, **{k: round(v, 6) for k, v in zip(names, means)}}
                record["steps_per_s"] = round(window_steps / elapsed, 3)
                record["images_per_s"] = round(window_steps * 2 * cfg.batch_size * d.world_size / elapsed, 1)
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                shown = dict(recon=f"{record['recon_a'] + record['recon_b']:.4f}", zero=f"{record['zero']:.4f}")
                if "mask" in record:
                    shown |= dict(mask_recon=f"{record['mask_recon_a'] + record['mask_recon_b']:.4f}",
                                  cycle=f"{record['cycle_a'] + record['cycle_b']:.4f}", mask=f"{record['mask']:.3f}")
                bar.set_postfix(**shown, disc=f"{record['disc']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                totals.zero_()
                window_steps, window_start = 0, time.perf_counter()
            paused = time.perf_counter()
            if cfg.sample_every and step % cfg.sample_every == 0:
                write_sample(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_all(step)
            window_start += time.perf_counter() - paused  # images/s counts training, not sample or checkpoint writing
        card = save_all(step)
        write_sample(step)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return card if card is not None else checkpoint.paths(out / "model")[0]
