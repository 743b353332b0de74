"""The inference API every caller uses (the service, the evaluation, the training loop's samples).

Each image is split into three codes: common (what both domains share), sep_a (what only domain a has) and sep_b
(what only domain b has); recombining codes and decoding performs the edits of the paper:

    transfer a's attribute onto b, removing b's    G(E_c(b), E_sA(a), 0)
    transfer b's attribute onto a, removing a's    G(E_c(a), 0, E_sB(b))
    intersection                                   G(E_c(c), E_sA(a), E_sB(b))
    removal                                        G(E_c(x), 0, 0)

All methods take batches; per-image options (target domain, strength, keep) may be tensors of shape (N,) so one
batch can mix requests.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .networks import Decoder, Encoder

Space = Literal["common", "a", "b", "all"]
SPACES: tuple[str, ...] = ("common", "a", "b", "all")
Attribute = Literal["a", "b", "both"]


class Codes(NamedTuple):
    """The three codes of a batch, each (N, C, 2, 2)."""

    common: torch.Tensor
    sep_a: torch.Tensor
    sep_b: torch.Tensor

    def index(self, idx: slice | torch.Tensor | int) -> "Codes":
        return Codes(*(t[idx] for t in self))

    @staticmethod
    def cat(parts: "list[Codes]") -> "Codes":
        return Codes(*(torch.cat(ts) for ts in zip(*parts)))


def _per_image(value: float | bool | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (N,) option as an (N, 1, 1, 1) tensor that broadcasts over code maps."""
    t = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"per-image option must be a scalar or have shape ({n},), not {tuple(t.shape)}")
    return t.view(n, 1, 1, 1)


class Disentangler(nn.Module):
    """E_c, E_sA, E_sB and G of one trained model, with the method's edits as batched operations."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.enc_common = Encoder(config, config.common_channels)
        self.enc_a = Encoder(config, config.sep_channels)
        self.enc_b = Encoder(config, config.sep_channels)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- the two primitives -------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> Codes:
        """Images (N, 3, S, S) in [-1, 1] -> Codes."""
        self._check_images(x)
        return Codes(self.enc_common(x), self.enc_a(x), self.enc_b(x))

    def decode(self, common: torch.Tensor, sep_a: torch.Tensor | None = None, sep_b: torch.Tensor | None = None) -> torch.Tensor:
        """Codes -> images (N, 3, S, S) in [-1, 1]; a missing separate code means zero (attribute absent)."""
        n = common.shape[0]
        zeros = common.new_zeros((n, self.config.sep_channels, *common.shape[2:]))
        sep_a = zeros if sep_a is None else sep_a
        sep_b = zeros if sep_b is None else sep_b
        return self.decoder(torch.cat([common, sep_a, sep_b], dim=1))

    # --- the edits ----------------------------------------------------------------------------------------------

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E_c(x), E_sA(x), E_sB(x)): the image as the model sees it."""
        return self.decode(*self.encode(x))

    def domain_scores(self, codes: Codes) -> torch.Tensor:
        """(N, 2): mean |sep_a| and mean |sep_b| per image. Training drives the other domain's code to zero, so
        the larger score names the domain whose attribute the image shows."""
        return torch.stack([codes.sep_a.abs().flatten(1).mean(1), codes.sep_b.abs().flatten(1).mean(1)], dim=1)

    def detect(self, codes: Codes) -> torch.Tensor:
        """(N,) long: 0 where the image looks like domain a, 1 like domain b."""
        return self.domain_scores(codes).argmax(dim=1)

    def transfer(
        self,
        content: torch.Tensor,
        guide: torch.Tensor,
        target: int | str | torch.Tensor | None = None,
        strength: float | torch.Tensor = 1.0,
        keep: bool | torch.Tensor = False,
    ) -> torch.Tensor:
        """Content's common code with the guide's attribute of domain `target` (0/'a', 1/'b', a domain name, or
        None to detect it from the guide's codes). The content's own attribute of the other domain is removed
        unless `keep`. `strength` scales the added code. Returns (N, 3, S, S)."""
        n = content.shape[0]
        codes = self.encode(torch.cat([content, guide]))
        c, g = codes.index(slice(0, n)), codes.index(slice(n, 2 * n))
        target_t = self.detect(g) if target is None else self._target(target, n, content.device)
        return self.decode(*self.transfer_codes(c, g, target_t, strength, keep))

    def transfer_codes(
        self, content: Codes, guide: Codes, target: torch.Tensor, strength: float | torch.Tensor = 1.0, keep: bool | torch.Tensor = False
    ) -> Codes:
        """The recombination behind `transfer`, on codes already computed (target: (N,) of 0/1)."""
        n = content.common.shape[0]
        to_a = _per_image(target == 0, n, content.common)
        s = _per_image(strength, n, content.common)
        k = _per_image(keep, n, content.common)
        sep_a = to_a * s * guide.sep_a + (1 - to_a) * k * content.sep_a
        sep_b = (1 - to_a) * s * guide.sep_b + to_a * k * content.sep_b
        return Codes(content.common, sep_a, sep_b)

    def intersect(
        self, content: torch.Tensor, guide_a: torch.Tensor, guide_b: torch.Tensor, strength: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        """G(E_c(content), E_sA(guide_a), E_sB(guide_b)): one face with a's attribute and b's at once."""
        n = content.shape[0]
        codes = self.encode(torch.cat([content, guide_a, guide_b]))
        s = _per_image(strength, n, codes.common)
        return self.decode(codes.common[:n], s * codes.sep_a[n : 2 * n], s * codes.sep_b[2 * n :])

    def remove(self, x: torch.Tensor, attribute: Attribute | torch.Tensor = "both") -> torch.Tensor:
        """Decode without the separate code(s): 'a', 'b', 'both', or an (N,) tensor of 0 (a), 1 (b), 2 (both)."""
        codes = self.encode(x)
        return self.decode(*self.remove_codes(codes, attribute))

    def remove_codes(self, codes: Codes, attribute: Attribute | torch.Tensor = "both") -> Codes:
        n = codes.common.shape[0]
        if isinstance(attribute, str):
            if attribute not in ("a", "b", "both"):
                raise ValueError(f"attribute must be 'a', 'b' or 'both', not {attribute!r}")
            attribute = {"a": 0, "b": 1, "both": 2}[attribute]
        which = torch.as_tensor(attribute, device=codes.common.device)
        drop_a = _per_image((which == 0) | (which == 2), n, codes.common)
        drop_b = _per_image((which == 1) | (which == 2), n, codes.common)
        return Codes(codes.common, (1 - drop_a) * codes.sep_a, (1 - drop_b) * codes.sep_b)

    def interpolate(self, start: Codes, end: Codes, steps: int, space: Space = "all") -> torch.Tensor:
        """Decode the straight path from `start` to `end` in one code space, the others held at `start`.

        start, end: Codes of N images each. Returns (N, steps, 3, S, S); step 0 decodes start's codes and the
        last step decodes start's codes with `space` replaced by end's."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, not {space!r}")
        if steps < 2:
            raise ValueError("interpolation needs at least 2 steps")
        n = start.common.shape[0]
        t = torch.linspace(0, 1, steps, device=start.common.device, dtype=start.common.dtype).view(1, steps, 1, 1, 1)
        moved = {"common": (0,), "a": (1,), "b": (2,), "all": (0, 1, 2)}[space]
        path = []
        for i, (s, e) in enumerate(zip(start, end)):
            s = s.unsqueeze(1)  # (N, 1, C, 2, 2)
            p = s + t * (e.unsqueeze(1) - s) if i in moved else s.expand(-1, steps, -1, -1, -1)
            path.append(p.reshape(n * steps, *s.shape[2:]))
        return self.decode(*path).view(n, steps, 3, self.config.image_size, self.config.image_size)

    # --- helpers ------------------------------------------------------------------------------------------------

    def _target(self, target: int | str | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        if isinstance(target, str):
            target = self.config.domain_index(target)
        t = torch.as_tensor(target, device=device, dtype=torch.long)
        return t.expand(n) if t.ndim == 0 else t

    def _check_images(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (s, s):
            raise ValueError(f"expected images of shape (N, 3, {s}, {s}), got {tuple(x.shape)}")
