"""The training loop of one recipe stage: one process, or one process per GPU/CPU under torchrun (DDP).

Each step: (1) the latent discriminator learns to tell the domains' common codes apart; (2) the encoders and
decoder minimise the weighted sum of the stage's active terms (`training/terms.py`) and the adversary. Rank 0
writes into the stage's directory: `log.jsonl`, sample grids, the stage's checkpoint (`model.safetensors` +
`model.json`) and `train_state.pt`, from which a re-run continues exactly (data batches are a pure function of the
step, so nothing is replayed). `training/recipes.py` runs the stages of a recipe in order.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import checkpoint
from models.config import ModelConfig
from models.disentangler import Disentangler
from models.images import save_grid
from models.networks import LatentDiscriminator

from . import terms
from .data import PairSource
from .figures import training_sample
from .passes import Generator
from .recipes import PRECISIONS, Recipe, RunOptions, Stage

log = logging.getLogger("did.train")

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


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
    """Join the torchrun job if launched by one (NCCL on CUDA, gloo on CPU) and pick this process's device with the
    one resolver the service uses too (`models.resolve_device`); under torchrun `auto` and `cuda` take the GPU of the
    local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    device = checkpoint.resolve_device(device_arg)
    if device.type == "cuda" and device_arg in ("auto", "cuda"):
        device = checkpoint.resolve_device(f"cuda:{d.local_rank}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > 1:  # share the cores between the processes on this machine instead of oversubscribing
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return d, device


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


def _time_is_up(deadline: float, device: torch.device, world_size: int) -> bool:
    """Whether the time budget is spent; under torchrun rank 0 decides for all, so every rank stops at the same step."""
    if deadline == math.inf:
        return False
    flag = torch.tensor([time.monotonic() >= deadline], dtype=torch.int32, device=device)
    if world_size > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def resolve_precision(device: torch.device, choice: str = "auto") -> str:
    """What a training step computes in, 'bf16 autocast' or 'float32', for `choice`: auto is bf16 autocast on CUDA and
    float32 on the CPU; bf16 asks for autocast, which the CPU computes natively only with AVX512-BF16 or AMX.

    On the CPU float32 is the default because bf16 cost quality there: the beard_glasses recipe run in bf16 on the
    2-core Xeon reconstructed 0.4-0.5 dB below the same recipe in float32, for 1.2x the speed (docs/evaluation.md,
    "Reproducing the shipped weights from recipes"; docs/benchmarks.md, "Training step throughput")."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {choice!r}")
    if choice == "float32" or (choice == "auto" and device.type != "cuda"):
        return "float32"
    if device.type == "cpu" and not checkpoint.cpu_has_bf16():
        raise ValueError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); use float32")
    return "bf16 autocast"


class Trainer:
    """The nets, their optimisers and one training step of a stage's objective; `train_stage` adds data, logging
    and checkpoints around it, and the training benchmark times `step` alone.

    `weights` maps term names (`terms.TERMS`) to weights; terms without a weight above zero are not computed. On
    the CPU the nets and batches are kept channels_last, where oneDNN's convolutions run fastest."""

    def __init__(self, weights: dict[str, float], model_cfg: ModelConfig, device: torch.device, world_size: int = 1, *,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), clip: float = 5.0,
                 common_noise: float = 0.0, precision: str = "auto"):
        terms.check_weights(weights, model_cfg.variant)
        if common_noise < 0:
            raise ValueError(f"common_noise must not be negative, not {common_noise}")
        self.clip = clip
        self.terms = terms.active(weights)
        self.weights = {t.name: float(weights[t.name]) for t in self.terms}
        self.adversary = terms.adversary_of(weights)
        self.adv_weight = float(weights.get(self.adversary.name, 0.0))
        self.needs_neither = self.adversary.groups == 3 or any(t.needs_neither for t in self.terms)
        self.metrics = tuple(self.weights) + (self.adversary.name, "disc", "loss")
        self.model = Disentangler(model_cfg).to(device).train()
        self.disc = LatentDiscriminator(model_cfg, groups=self.adversary.groups).to(device).train()
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)  # before the optimisers and DDP take the parameters
        self.disc.to(memory_format=self.memory_format)
        self.precision = resolve_precision(device, precision)
        kind = device.type
        self.autocast = ((lambda: torch.autocast(kind, dtype=torch.bfloat16)) if self.precision == "bf16 autocast"
                         else nullcontext)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=lr, betas=tuple(betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=tuple(betas))
        removal = not model_cfg.has_mask and any("removed_a" in t.reads for t in self.terms)
        cycle = not model_cfg.has_mask and any({"cycle_a", "cycle_b"} & set(t.reads) for t in self.terms)
        self.gen: nn.Module = Generator(self.model, removal=removal, common_noise=common_noise, cycle=cycle)
        self.disc_ddp: nn.Module = self.disc
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.gen = DistributedDataParallel(self.gen, device_ids=ids)
            self.disc_ddp = DistributedDataParallel(self.disc, device_ids=ids)

    def forward(self, a: torch.Tensor, b: torch.Tensor, neither: torch.Tensor | None = None) -> terms.StepInputs:
        """The step's forward pass and what the terms read of it."""
        if self.needs_neither and neither is None:
            raise ValueError("this objective reads faces with neither attribute: each step needs a batch of them")
        a, b = a.contiguous(memory_format=self.memory_format), b.contiguous(memory_format=self.memory_format)
        if neither is not None:
            neither = neither.contiguous(memory_format=self.memory_format)
        with self.autocast():
            out = self.gen(a, b, neither if self.needs_neither else None)
        return terms.StepInputs(a, b, neither, out, self.read)

    def step(self, a: torch.Tensor, b: torch.Tensor, neither: torch.Tensor | None = None) -> torch.Tensor:
        """One step on a batch of each domain (and, when a term reads them, a batch of faces with neither attribute);
        returns `self.metrics` (each term's value, the adversary's, the discriminator's loss, the total) as one
        detached tensor (no host sync)."""
        n = a.shape[0]
        s = self.forward(a, b, neither)
        values = {t.name: t.fn(s) for t in self.terms}
        codes = [s.out.codes_a.common, s.out.codes_b.common]
        if self.adversary.groups == 3:  # the third group: codes of faces with neither attribute
            codes.append(s.out.neither.codes.common)
        common = torch.cat(codes).float()

        # (1) the latent discriminator learns to tell the groups apart, on codes detached from the encoder
        loss_d = terms.discriminator_loss(self.adversary, self.disc_ddp(common.detach()), n)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        nn.utils.clip_grad_norm_(self.disc.parameters(), self.clip)
        self.opt_d.step()

        # (2) encoders + decoder. The adversary reads the updated discriminator through detached copies of its
        # parameters, so gradients reach the encoder only and DDP's hooks on the discriminator stay untouched.
        s.logits = functional_call(self.disc, {k: v.detach() for k, v in self.disc.named_parameters()}, (common,))
        values[self.adversary.name] = self.adversary.fn(s)
        loss_g = sum(w * values[k] for k, w in self.weights.items()) + self.adv_weight * values[self.adversary.name]
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt_g.step()
        values["disc"], values["loss"] = loss_d, loss_g
        return torch.stack([values[k].float() for k in self.metrics]).detach()

    def read(self, domain: str, x: torch.Tensor) -> torch.Tensor:
        """E_sA(x) (domain 'a') or E_sB(x) in float32 through detached copies of the encoder's parameters: the
        encoder judges x without being trained by the judgement; the gradient flows back into x alone."""
        encoder = self.model.enc_a if domain == "a" else self.model.enc_b
        with self.autocast():
            code = functional_call(encoder, {k: v.detach() for k, v in encoder.named_parameters()}, (x,))
        return code.float()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore nets and optimisers (moments and all)."""
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def initialise_from(model: Disentangler, path: str | Path) -> None:
    """Copy a checkpoint's weights into a fresh model: the start of a stage that continues an earlier one.

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
        raise ValueError(f"{path}: the checkpoint's nets have other sizes: {diff}")
    target = model.state_dict()
    with torch.no_grad():
        for name, value in source.state_dict().items():
            if name not in target:
                raise ValueError(f"{path}: the checkpoint has a tensor this model lacks ({name})")
            dest = target[name]
            rgb = dest[:3] if dest.dim() == 1 else dest[:, :3]  # output channels: dim 1 of a transposed conv's weight
            if dest.shape == value.shape:
                dest.copy_(value)
            elif name.startswith("decoder.to_rgb.") and rgb.shape == value.shape:
                rgb.copy_(value)
            else:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, this model needs {tuple(dest.shape)}")


@dataclass
class StageResult:
    """Where a stage stands after `train_stage`: finished, or stopped by the time budget at `step`."""

    finished: bool
    step: int
    seconds: float  # training time of the stage, over every process that worked on it
    model: Path  # the stage's checkpoint (DIR/model)


def train_stage(stage: Stage, recipe: Recipe, *, source: PairSource, out: Path, opts: RunOptions, dist_info: Dist,
                device: torch.device, init: Path | None, data_offset: int, deadline: float,
                training: dict[str, Any]) -> StageResult:
    """Train one stage of `recipe` into `out` (or continue it from `out/train_state.pt`), starting from the weights
    of `init` (a previous stage's checkpoint) or a fresh initialisation drawn from the recipe's seed. The data stream
    starts at step `data_offset`, so consecutive stages see new faces. A finished stage returns at once. `training`
    is what the stage's card records beside its steps."""
    d, steps, batch_size, seed = dist_info, stage.steps, stage.batch_size, recipe.seed
    model_cfg = recipe.model_config(stage, source.domains)
    state_path = out / STATE_FILE
    state = torch.load(state_path, map_location=device, weights_only=True) if state_path.exists() else None
    if state is not None and int(state["step"]) >= steps:
        return StageResult(True, int(state["step"]), float(state.get("seconds", 0.0)), out / "model")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + d.rank)
    trainer = Trainer(stage.weights, model_cfg, device, d.world_size, lr=stage.lr, betas=recipe.betas, clip=recipe.clip,
                      common_noise=stage.common_noise, precision=opts.precision)
    model = trainer.model
    if trainer.needs_neither and not hasattr(source, "neither_batches"):
        raise ValueError(f"the terms {', '.join(t.name for t in trainer.terms if t.needs_neither) or 'neither_adversarial'} "
                         f"read faces with neither attribute, which only the synthetic benchmark renders; "
                         f"{source.describe().get('kind', 'this data')} has none")
    step, seconds = 0, 0.0
    if state is not None:
        saved_cfg = ModelConfig.from_dict(state["model_config"])
        if saved_cfg != model_cfg:
            raise ValueError(f"{state_path} was trained with {saved_cfg}, this stage builds {model_cfg}")
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, ValueError) as e:  # tensors of another layout
            first = str(e).splitlines()[0]
            raise ValueError(f"{state_path} holds networks of another layout and cannot be continued ({first}); "
                             "use a new --out") from None
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        torch.set_rng_state(state["rng_cpu"][d.rank % len(state["rng_cpu"])].cpu())
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state(state["rng_cuda"][d.rank % len(state["rng_cuda"])].cpu())
        if d.main:
            _truncate_log(out / LOG_FILE, step)
            log.info("continuing %s at step %d of %d", out, step, steps)
    elif init is not None:  # every rank copies the same weights, so the DDP replicas start equal
        initialise_from(model, init)
    run_start = time.perf_counter()

    def save_all(at_step: int) -> None:
        """Rank 0: the stage's inference checkpoint (fp32), then the training state (each written atomically)."""
        if not d.main:
            return
        checkpoint.save(model, out / "model", training={**training, "steps": at_step}, framing=source.framing)
        _atomic_torch_save(
            {
                "step": at_step,
                "seconds": seconds + time.perf_counter() - run_start,
                "model_config": model_cfg.to_dict(),
                **trainer.state_dict(),
                "rng_cpu": [torch.get_rng_state()],
                "rng_cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            },
            state_path,
        )

    # Fixed faces for the sample grids: the same ones at every sample step (from a seed of their own).
    sample_a, sample_b = next(iter(source.batches(6, seed=seed + 1_000_003, device=device, num_workers=0)))

    def write_sample(at_step: int) -> None:
        if not d.main:
            return
        model.eval()
        save_grid(training_sample(model, sample_a, sample_b)[None], out / "samples" / f"step_{at_step:07d}.png")
        model.train()

    start = data_offset + step
    data = source.batches(batch_size, seed=seed, start_step=start, rank=d.rank, world_size=d.world_size, device=device,
                          num_workers=opts.num_workers)
    neither = source.neither_batches(batch_size, seed=seed, start_step=start, rank=d.rank,  # type: ignore[attr-defined]
                                     world_size=d.world_size, device=device) if trainer.needs_neither else None
    names = trainer.metrics
    totals = torch.zeros(len(names), device=device)
    window_steps, window_start = 0, time.perf_counter()
    bar = tqdm(total=steps, initial=step, disable=not (d.main and opts.progress), unit="step", dynamic_ncols=True,
               desc=out.name)
    log_file = open(out / LOG_FILE, "a") if d.main else None
    try:
        while step < steps:
            if step % opts.log_every == 0 and _time_is_up(deadline, device, d.world_size):
                log.info("time budget reached at step %d of %d of %s; saving", step, steps, out.name)
                break
            a, b = next(data)
            metrics = trainer.step(a, b, next(neither) if neither is not None else None)
            step += 1
            window_steps += 1
            totals += metrics
            bar.update(1)

            if step % opts.log_every == 0 or step == steps:
                if d.world_size > 1:
                    dist.all_reduce(totals)
                    totals /= d.world_size
                elapsed = time.perf_counter() - window_start
                means = (totals / window_steps).tolist()
                if any(not math.isfinite(v) for v in means):
                    raise FloatingPointError(f"loss is not finite at step {step}: {dict(zip(names, means))}")
                record = {"step": step, **{k: round(v, 6) for k, v in zip(names, means)}}
                record["steps_per_s"] = round(window_steps / elapsed, 3)
                record["images_per_s"] = round(window_steps * 2 * batch_size * d.world_size / elapsed, 1)
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", disc=f"{record['disc']:.3f}",
                                img_s=f"{record['images_per_s']:.0f}")
                totals.zero_()
                window_steps, window_start = 0, time.perf_counter()
            paused = time.perf_counter()
            if opts.sample_every and step % opts.sample_every == 0:
                write_sample(step)
            if opts.checkpoint_every and step % opts.checkpoint_every == 0 and step < steps:
                save_all(step)
            window_start += time.perf_counter() - paused  # images/s counts training, not sample or checkpoint writing
        save_all(step)
        write_sample(step)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if d.world_size > 1:
        dist.barrier()  # the stage's checkpoint is on disk before any rank starts the next stage from it
    return StageResult(step >= steps, step, seconds + time.perf_counter() - run_start, out / "model")
