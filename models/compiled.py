"""Fixed batch shapes for serving: each network of a Disentangler runs at a few batch sizes only.

A compiled network (torch.compile; on CUDA in its "reduce-overhead" mode, which replays CUDA graphs) is specialised
to the shapes it has seen, and every new batch size costs a compilation. `Bucketed` pads a batch of N rows up to the
smallest bucket that holds it (with copies of its last row) and runs the network there, so the service's
arbitrary batch sizes map onto len(buckets) shapes that its warm-up compiles once. Every net is per-sample
(instance and group norms), so the padding rows change nothing in the real rows.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from .disentangler import Disentangler

Compile = Literal["none", "buckets", "compile"]
NETS = ("enc_common", "enc_a", "enc_b", "decoder")


def buckets_up_to(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two at or above `largest`."""
    out = [1]
    while out[-1] < largest:
        out.append(out[-1] * 2)
    return tuple(out)


class Bucketed(nn.Module):
    """`net` run at the batch sizes of `buckets`: a batch is padded up to the next bucket, a batch larger than the
    largest one runs in chunks of that size."""

    def __init__(self, net: nn.Module, buckets: tuple[int, ...]):
        super().__init__()
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, not {buckets}")
        self.net, self.buckets = net, tuple(sorted(set(buckets)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, top = x.shape[0], self.buckets[-1]
        if n == 0:
            return self.net(x)
        if n > top:
            return torch.cat([self(part) for part in x.split(top)])
        size = next(b for b in self.buckets if b >= n)
        if size == n:
            return self.net(x)
        padded = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        return self.net(padded)[:n]


def prepare(model: Disentangler, mode: Compile, max_rows: int) -> Disentangler:
    """Give `model`'s encoders and decoder fixed batch shapes up to `max_rows` rows ('buckets'), and compile each
    ('compile': torch.compile, CUDA graphs on CUDA). 'none' leaves the model as it is. The model must be in eval
    mode and made ready to serve (models.networks.inference_ready)."""
    if mode not in get_args(Compile):
        raise ValueError(f"mode must be one of {', '.join(map(repr, get_args(Compile)))}, not {mode!r}")
    if mode == "none":
        return model
    # The decoder of a mask model's edit decodes up to four code sets per image (base, both masks, the edit).
    rows = {name: max_rows * (4 if name == "decoder" else 1) for name in NETS}
    if mode == "compile":
        # Each shape is one compilation of the networks' shared forward code (the three encoders are one class), and
        # past dynamo's per-frame limit (8 by default) further shapes would silently run uncompiled.
        shapes = sum(len(buckets_up_to(n)) for n in rows.values())
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), shapes))
    for name in NETS:
        net = getattr(model, name)
        if mode == "compile":
            net = torch.compile(net, dynamic=False, mode="reduce-overhead" if model.device.type == "cuda" else None)
        setattr(model, name, Bucketed(net, buckets_up_to(rows[name])))
    return model


@torch.inference_mode()
def warm(model: Disentangler) -> int:
    """Run every bucket of every Bucketed network once (a compiled one compiles there); returns the number of
    shapes run. Call it from the thread that will serve the model."""
    cfg, shapes = model.config, 0
    param = next(model.parameters())
    for name in NETS:
        net = getattr(model, name)
        if not isinstance(net, Bucketed):
            continue
        for b in net.buckets:
            shape = (b, 3, cfg.image_size, cfg.image_size) if name != "decoder" else (b, cfg.code_channels, *cfg.common_shape)
            net(torch.zeros(shape, device=param.device, dtype=param.dtype))
            shapes += 1
    return shapes
