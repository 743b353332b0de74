"""The models the service answers with: every checkpoint of the weights directory, loaded by the core's loader,
prepared for inference, each with its own batcher."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import models
from models import CheckpointError, Disentangler, resolve_device
from models import compiled
from models.calibration import Calibration
from models.checkpoint import compute_dtype
from models.networks import inference_ready

from .batcher import Batcher
from .errors import UnknownModel
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("did.app")

PREFERRED_DEFAULT = "smile_glasses_mask"  # the best evaluated bundled model (docs/evaluation.md), when loaded


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Disentangler
    card: dict[str, Any]
    batcher: Batcher | None = field(default=None, repr=False)
    calibration: Calibration | None = None  # the card's: how far its training images sit from their reconstructions

    @property
    def config(self) -> models.ModelConfig:
        return self.model.config

    @property
    def domains(self) -> tuple[str, str]:
        return self.config.domain_a, self.config.domain_b


class Registry:
    """Name -> LoadedModel; `load` raises CheckpointError naming the file and the reason."""

    def __init__(self, entries: list[LoadedModel], default: str, device: torch.device, dtype: torch.dtype):
        self.entries = {e.name: e for e in entries}
        self.default, self.device, self.dtype = default, device, dtype
        self.ready = False

    @classmethod
    def load(cls, settings: Settings) -> "Registry":
        weights = Path(settings.weights)
        if not weights.is_dir():
            raise CheckpointError(f"{weights}: weights directory not found")
        cards = sorted(weights.glob("*.json"))
        if not cards:
            raise CheckpointError(f"{weights}: no checkpoints (NAME.json + NAME.safetensors) in the weights directory")
        device = resolve_device(settings.device)
        dtype, why = compute_dtype(device, settings.dtype)
        if why:
            log.warning("DID_DTYPE=%s", why)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        elif settings.workers > 1:  # each worker process would otherwise take one thread per core for itself
            torch.set_num_threads(max(1, torch.get_num_threads() // settings.workers))
        entries = []
        for card in cards:
            start = time.perf_counter()
            model = inference_ready(models.load(card, device=device, dtype=dtype))
            if settings.channels_last:
                model.to(memory_format=torch.channels_last)
            compiled.prepare(model, settings.compile, settings.max_batch)
            entries.append(LoadedModel(card.stem, card, model, model.card, calibration=Calibration.from_card(model.card)))
            log.info("loaded %s (%s/%s, %d px) on %s in %.2fs", card.name, model.config.domain_a, model.config.domain_b,
                     model.config.image_size, device, time.perf_counter() - start)
        names = [e.name for e in entries]
        default = settings.default_model or (PREFERRED_DEFAULT if PREFERRED_DEFAULT in names else names[0])
        if default not in names:
            raise CheckpointError(f"{weights}: default model {default!r} is not among the checkpoints {names}")
        return cls(entries, default, device, dtype)

    def start(self, settings: Settings, metrics: Metrics | None) -> None:
        """One batcher per model (needs the running event loop)."""
        for e in self.entries.values():
            e.batcher = Batcher(e.name, e.model, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                queue_size=settings.queue_size, metrics=metrics, dtype=self.dtype,
                                in_flight=(lambda: metrics.active) if metrics else None)
            e.batcher.start()
        if metrics:
            metrics.models.set(len(self.entries))

    async def warmup(self, rows: int) -> None:
        """One batch of `rows` images through encode and decode of every model (allocations, kernels, caches)."""
        for e in self.entries.values():
            assert e.batcher is not None
            start = time.perf_counter()
            s = e.config.image_size
            codes = await e.batcher.encode(torch.zeros(rows, 3, s, s))
            await e.batcher.decode(codes)
            shapes = await e.batcher.call(compiled.warm)  # every fixed batch shape (DID_COMPILE), in the model's thread
            log.info("warmed up %s with a batch of %d%s in %.2fs", e.name, rows,
                     f" and {shapes} fixed batch shapes" if shapes else "", time.perf_counter() - start)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for e in self.entries.values():
            if e.batcher is not None:
                await e.batcher.stop()

    def get(self, name: str | None) -> LoadedModel:
        key = name or self.default
        try:
            return self.entries[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; loaded: {', '.join(self.entries)}") from None
