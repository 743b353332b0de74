"""The inference API every caller uses (the service, the evaluation, the training loop's samples).

Each image is split into three codes: common (what both domains share), sep_a (what only domain a has) and sep_b
(what only domain b has); recombining codes and decoding performs the edits of the paper:

    transfer a's attribute onto b, removing b's    G(E_c(b), E_sA(a), 0)
    transfer b's attribute onto a, removing a's    G(E_c(a), 0, E_sB(b))
    intersection                                   G(E_c(c), E_sA(a), E_sB(b))
    removal                                        G(E_c(x), 0, 0)

All methods take batches; per-image options (target domain, strength, keep) may be tensors of shape (N,) so one
batch can mix requests.

Mask-based variant (Mokady et al., ICLR 2020): the decoder also predicts a mask m in [0, 1] of where the attribute
is, and an edit only changes the pixels inside it. `decode` composites `m * G(codes) + (1 - m) * G(E_c, 0, 0)`;
the edits of input images (`transfer`, `intersect`, `remove`) go through `render`, which first removes the
attributes being replaced from the input image by their masks, then pastes the new attribute through its mask onto
the input image itself, so pixels outside the attribute's region stay the input's. `segment` returns the masks.
An `Edit` describes one such edit on codes, so the service's batcher can render many requests in one call.

Each edit computes only what it reads. `encode(x, parts)` runs only the encoders named in `parts` (the codes not
asked for are None), the `*_parts` methods say which codes of each input an edit reads, and `render` decodes only
the rows its Edit uses: a plain transfer with a known target is E_c(content), one separate encoder on the guide and
one decode, where encoding both images fully would run six encoder passes.
"""
from __future__ import annotations

from typing import Iterable, Literal, NamedTuple

import torch
from torch import nn

from .config import ModelConfig
from .networks import Decoder, Encoder

Space = Literal["common", "a", "b", "all"]
SPACES: tuple[str, ...] = ("common", "a", "b", "all")
Attribute = Literal["a", "b", "both"]
REMOVAL_THRESHOLD = 0.1  # the mask paper's removal replaces the pixels whose mask exceeds this


Part = Literal["common", "a", "b"]
PARTS: tuple[Part, ...] = ("common", "a", "b")  # the encoders E_c, E_sA, E_sB, in the order of Codes' fields


class Codes(NamedTuple):
    """The three codes of a batch, each (N, C, H, W) (2x2, or a larger common map); a code that was not computed (`encode`'s `parts`) is None."""

    common: torch.Tensor
    sep_a: torch.Tensor
    sep_b: torch.Tensor

    def index(self, idx: slice | torch.Tensor | int) -> "Codes":
        return Codes(*(None if t is None else t[idx] for t in self))

    @staticmethod
    def cat(parts: "list[Codes]") -> "Codes":
        if len(parts) == 1:  # one batch: itself, not a copy (the service's plans join one request's codes per call)
            return parts[0]
        out = []
        for name, ts in zip(Codes._fields, zip(*parts)):
            missing = sum(t is None for t in ts)
            if 0 < missing < len(ts):
                raise ValueError(f"cannot concatenate codes where some batches lack the {name} code")
            out.append(None if missing else torch.cat(ts))
        return Codes(*out)

    @property
    def parts(self) -> frozenset[Part]:
        """The codes present."""
        return frozenset(name for name, t in zip(PARTS, self) if t is not None)


class Edit(NamedTuple):
    """An edit of N input images, decided on their codes and carried out by `Disentangler.render`.

    A plain model decodes `codes`. A mask model removes the attributes flagged in drop_a / drop_b from the input
    image (inside their masks, hard at `threshold` or soft), then, where `paste`, composites G(codes) through its
    own mask over the result. Every field but the codes is (N,), so the edits of several requests concatenate."""

    codes: Codes  # the recombined codes to decode
    source: Codes  # the input images' own codes (their attribute-free decode and attribute masks)
    drop_a: torch.Tensor  # (N,) bool: remove the input's attribute a before pasting
    drop_b: torch.Tensor  # (N,) bool: remove the input's attribute b before pasting
    paste: torch.Tensor  # (N,) bool: paste G(codes) through its mask (False: a removal only)
    threshold: torch.Tensor  # (N,) float: hard removal replaces the pixels whose mask exceeds this
    soft: torch.Tensor  # (N,) bool: blend by the mask instead of thresholding it

    def index(self, idx: slice | torch.Tensor | int) -> "Edit":
        return Edit(self.codes.index(idx), self.source.index(idx), *(t[idx] for t in self[2:]))

    @staticmethod
    def cat(parts: "list[Edit]") -> "Edit":
        if len(parts) == 1:
            return parts[0]
        return Edit(Codes.cat([p.codes for p in parts]), Codes.cat([p.source for p in parts]),
                    *(torch.cat(ts) for ts in zip(*(p[2:] for p in parts))))


def _per_image(value: float | bool | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (N,) option as an (N, 1, 1, 1) tensor that broadcasts over code maps."""
    t = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"per-image option must be a scalar or have shape ({n},), not {tuple(t.shape)}")
    return t.view(n, 1, 1, 1)


def _flags(value: bool | float | torch.Tensor, n: int, device: torch.device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A scalar or (N,) option as an (N,) tensor of `dtype` (the per-image fields of an Edit)."""
    t = torch.as_tensor(value, device=device).to(dtype)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"per-image option must be a scalar or have shape ({n},), not {tuple(t.shape)}")
    return t


def _column(t: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to broadcast a per-image value over images or masks."""
    return t.view(-1, 1, 1, 1)


def _as_parts(parts: Iterable[str]) -> frozenset[Part]:
    out = frozenset(parts)
    if not out <= set(PARTS):
        raise ValueError(f"parts must be among {PARTS}, not {sorted(out)}")
    return out  # type: ignore[return-value]


def _values(option: bool | float | int | str | torch.Tensor) -> set:
    """The distinct values of a scalar or (N,) option, as Python values (what an edit's `*_parts` decide on)."""
    if isinstance(option, torch.Tensor):
        return set(option.flatten().tolist())
    return {option}


def _spread(code: torch.Tensor, side: int) -> torch.Tensor:
    """A separate code's map at a larger common map's side: each cell of a 2x2 code over its quarter of the map, a
    1x1 code over all of it."""
    k = side // code.shape[-1]
    return code if k == 1 else code.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)


class Disentangler(nn.Module):
    """E_c, E_sA, E_sB and G of one trained model, with the method's edits as batched operations."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.enc_common = Encoder(config, config.common_channels, config.common_map, config.common_input)
        separate = "image+colours" if config.common_input == "contrast" else "image"
        self.enc_a = Encoder(config, config.sep_channels, config.separate_map, separate)
        self.enc_b = Encoder(config, config.sep_channels, config.separate_map, separate)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in (their weights'); encode casts images of any float dtype to it."""
        return next(self.parameters()).dtype

    # --- the two primitives -------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, parts: Iterable[Part] = PARTS) -> Codes:
        """Images (N, 3, S, S) in [-1, 1] -> Codes, running only the encoders of `parts` ('common', 'a', 'b'); the
        codes not asked for are None."""
        self._check_images(x)
        x = x.to(self.dtype)
        want = _as_parts(parts)
        return Codes(*(enc(x) if name in want else None
                       for name, enc in zip(PARTS, (self.enc_common, self.enc_a, self.enc_b))))

    def decode_parts(
        self, common: torch.Tensor, sep_a: torch.Tensor | None = None, sep_b: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes -> (the generator's raw RGB (N, 3, S, S) in [-1, 1], its mask (N, 1, S, S) in [0, 1] or None for
        a plain model); a missing separate code means zero (attribute absent)."""
        n, side = common.shape[0], common.shape[-1]
        zeros = common.new_zeros((n, self.config.sep_channels, side, side))
        sep_a, sep_b = (zeros if code is None else _spread(code, side) for code in (sep_a, sep_b))
        out = self.decoder(torch.cat([common, sep_a, sep_b], dim=1))
        if not self.config.has_mask:
            return out, None
        return out[:, :3], out[:, 3:]

    def decode(
        self,
        common: torch.Tensor,
        sep_a: torch.Tensor | None = None,
        sep_b: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Codes -> images (N, 3, S, S) in [-1, 1]; a missing separate code means zero (attribute absent).

        A mask model answers `mask * rgb + (1 - mask) * base`, the attribute drawn through its mask over `base`
        (default: the attribute-free decode G(common, 0, 0), so with both separate codes zero the answer is that
        base). Plain models ignore `base`."""
        if not self.config.has_mask:
            return self.decode_parts(common, sep_a, sep_b)[0]
        n = common.shape[0]
        if base is not None:
            rgb, mask = self.decode_parts(common, sep_a, sep_b)
            return mask * rgb + (1 - mask) * base
        zeros = common.new_zeros((n, self.config.sep_channels, *common.shape[2:]))
        sep_a = zeros if sep_a is None else sep_a
        sep_b = zeros if sep_b is None else sep_b
        # one decoder call for the codes and their attribute-free base
        rgb, mask = self.decode_parts(torch.cat([common, common]), torch.cat([sep_a, zeros]), torch.cat([sep_b, zeros]))
        return mask[:n] * rgb[:n] + (1 - mask[:n]) * rgb[n:]

    # --- the edits ----------------------------------------------------------------------------------------------

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E_c(x), E_sA(x), E_sB(x)): the image as the model sees it."""
        return self.decode(*self.encode(x))

    def domain_scores(self, codes: Codes) -> torch.Tensor:
        """(N, 2): mean |sep_a| and mean |sep_b| per image. Training drives the other domain's code to zero, so
        the larger score names the domain whose attribute the image shows."""
        return torch.stack([codes.sep_a.abs().flatten(1).mean(1), codes.sep_b.abs().flatten(1).mean(1)], dim=1)

    def detect(self, codes: Codes) -> torch.Tensor:
        """(N,) long: 0 where the image looks like domain a, 1 like domain b (reads both separate codes)."""
        if codes.sep_a is None or codes.sep_b is None:
            raise ValueError("detecting the domain reads both separate codes; encode with parts 'a' and 'b'")
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
        target_t = None if target is None else self._target(target, n, content.device)
        content_parts, guide_parts = self.transfer_parts(target_t, keep)
        c, g = self.encode(content, content_parts), self.encode(guide, guide_parts)
        return self.render(content, self.transfer_edit(c, g, self.detect(g) if target_t is None else target_t, strength, keep))[0]

    def transfer_parts(self, target: int | torch.Tensor | None, keep: bool | torch.Tensor = False) -> tuple[frozenset[Part], frozenset[Part]]:
        """The codes a transfer reads, (of the content, of the guide). The guide: the target domain's separate code
        (both when the target is detected from them). The content: its common code, and its own code of the
        other domain where it is kept (`keep`) or, in a mask model, removed through its mask."""
        targets = {0, 1} if target is None else _values(target)
        own = self.config.has_mask or True in _values(keep)
        other = {"b" if t == 0 else "a" for t in targets} if own else set()
        return _as_parts({"common", *other}), _as_parts({"a" if t == 0 else "b" for t in targets})

    def transfer_edit(
        self, content: Codes, guide: Codes, target: torch.Tensor, strength: float | torch.Tensor = 1.0, keep: bool | torch.Tensor = False
    ) -> Edit:
        """The Edit behind `transfer`: decode `transfer_codes`; a mask model first removes the content's own
        attribute of the other domain (unless keep) and pastes the new attribute onto the content image."""
        n = content.common.shape[0]
        device = content.common.device
        to_a = target == 0
        k = _flags(keep, n, device)
        return self._edit(self.transfer_codes(content, guide, target, strength, keep), content, ~to_a & ~k, to_a & ~k,
                          _flags(True, n, device), _flags(REMOVAL_THRESHOLD, n, device, content.common.dtype),
                          _flags(False, n, device))

    def transfer_codes(
        self, content: Codes, guide: Codes, target: torch.Tensor, strength: float | torch.Tensor = 1.0, keep: bool | torch.Tensor = False
    ) -> Codes:
        """The recombination behind `transfer`, on codes already computed (target: (N,) of 0/1)."""
        n = content.common.shape[0]
        to_a_flag, keep_flag = target == 0, _flags(keep, n, content.common.device)
        to_a = _per_image(to_a_flag, n, content.common)
        s = _per_image(strength, n, content.common)
        k = _per_image(keep, n, content.common)
        sep_a = (to_a * s * self._code(guide, "sep_a", to_a_flag, "a transfer to domain a")
                 + (1 - to_a) * k * self._code(content, "sep_a", ~to_a_flag & keep_flag, "keeping the content's attribute"))
        sep_b = ((1 - to_a) * s * self._code(guide, "sep_b", ~to_a_flag, "a transfer to domain b")
                 + to_a * k * self._code(content, "sep_b", to_a_flag & keep_flag, "keeping the content's attribute"))
        return Codes(content.common, sep_a, sep_b)

    def intersect(
        self, content: torch.Tensor, guide_a: torch.Tensor, guide_b: torch.Tensor, strength: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        """G(E_c(content), E_sA(guide_a), E_sB(guide_b)): one face with a's attribute and b's at once."""
        parts = self.intersect_parts()
        return self.render(content, self.intersect_edit(*(self.encode(x, p) for x, p in zip((content, guide_a, guide_b), parts)),
                                                        strength))[0]

    def intersect_parts(self) -> tuple[frozenset[Part], frozenset[Part], frozenset[Part]]:
        """The codes an intersection reads, (of the content, of guide_a, of guide_b): the content's common code
        (and, in a mask model, both its separate codes, whose masks remove its own attributes), guide_a's code a,
        guide_b's code b."""
        return (_as_parts(PARTS if self.config.has_mask else ("common",)), _as_parts(("a",)), _as_parts(("b",)))

    def intersect_edit(self, content: Codes, guide_a: Codes, guide_b: Codes, strength: float | torch.Tensor = 1.0) -> Edit:
        """The Edit behind `intersect`; a mask model removes both of the content's attributes before pasting."""
        n = content.common.shape[0]
        device = content.common.device
        s = _per_image(strength, n, content.common)
        yes = _flags(True, n, device)
        return self._edit(Codes(content.common, s * guide_a.sep_a, s * guide_b.sep_b), content, yes, yes, yes,
                          _flags(REMOVAL_THRESHOLD, n, device, content.common.dtype), _flags(False, n, device))

    def remove(
        self, x: torch.Tensor, attribute: Attribute | torch.Tensor = "both", threshold: float | torch.Tensor = REMOVAL_THRESHOLD,
        soft: bool | torch.Tensor = False,
    ) -> torch.Tensor:
        """Remove the separate attribute(s): 'a', 'b', 'both', or an (N,) tensor of 0 (a), 1 (b), 2 (both).

        A plain model decodes without the code(s). A mask model keeps the input's pixels and replaces only the
        attribute's region (its mask m; the larger of both masks for 'both') by the attribute-free decode
        G(E_c(x), 0, 0): where m > threshold (hard, the paper's removal), or m * G + (1 - m) * x (soft)."""
        return self.render(x, self.remove_edit(self.encode(x, self.remove_parts(attribute)), attribute, threshold, soft))[0]

    def remove_parts(self, attribute: Attribute | torch.Tensor | None = "both") -> frozenset[Part]:
        """The codes a removal reads (None: the attribute is detected, so both separate codes): the common code,
        and of a plain model the separate codes it keeps, of a mask model those it removes (their masks)."""
        if attribute is None:
            return _as_parts(PARTS)
        n = attribute.numel() if isinstance(attribute, torch.Tensor) else 1
        drop_a, drop_b = self._drops(attribute, n, torch.device("cpu"))
        read = (drop_a, drop_b) if self.config.has_mask else (~drop_a, ~drop_b)
        return _as_parts({"common", *(p for p, rows in zip(("a", "b"), read) if bool(rows.any()))})

    def remove_edit(
        self, codes: Codes, attribute: Attribute | torch.Tensor = "both", threshold: float | torch.Tensor = REMOVAL_THRESHOLD,
        soft: bool | torch.Tensor = False,
    ) -> Edit:
        """The Edit behind `remove` (plain models: decode `remove_codes`)."""
        n = codes.common.shape[0]
        device = codes.common.device
        drop_a, drop_b = self._drops(attribute, n, device)
        new = self.remove_codes(codes, attribute) if not self.config.has_mask else codes  # a mask removal pastes nothing
        return self._edit(new, codes, drop_a, drop_b, _flags(False, n, device),
                          _flags(threshold, n, device, codes.common.dtype), _flags(soft, n, device))

    def remove_codes(self, codes: Codes, attribute: Attribute | torch.Tensor = "both") -> Codes:
        n = codes.common.shape[0]
        drop_a, drop_b = self._drops(attribute, n, codes.common.device)
        keep_a, keep_b = _per_image(~drop_a, n, codes.common), _per_image(~drop_b, n, codes.common)
        return Codes(codes.common, keep_a * self._code(codes, "sep_a", ~drop_a, "a removal that keeps attribute a"),
                     keep_b * self._code(codes, "sep_b", ~drop_b, "a removal that keeps attribute b"))

    def render(self, x: torch.Tensor, edit: Edit) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Carry out an Edit of images x (N, 3, S, S): (edited images, masks (N, 1, S, S) or None for plain).

        A mask model's mask is the pasted attribute's where `paste`, else the removed region's. One decoder call
        decodes what the rows read: every row's attribute-free base G(c, 0, 0), the mask of a's code where a is
        dropped, of b's where b is, and the edited codes where something is pasted."""
        if not self.config.has_mask:
            return self.decode(*edit.codes), None
        src, new = edit.source, edit.codes
        rows = {"a": edit.drop_a.nonzero().squeeze(1), "b": edit.drop_b.nonzero().squeeze(1),
                "new": edit.paste.nonzero().squeeze(1)}
        zeros = torch.zeros_like(src.sep_a)
        # (name, common, sep_a, sep_b) of each decode, one decoder call for all
        wanted = [("base", src.common, zeros, zeros),
                  ("a", src.common[rows["a"]], src.sep_a[rows["a"]], zeros[rows["a"]]),
                  ("b", src.common[rows["b"]], zeros[rows["b"]], src.sep_b[rows["b"]]),
                  ("new", new.common[rows["new"]], new.sep_a[rows["new"]], new.sep_b[rows["new"]])]
        rgb, mask = self.decode_parts(*(torch.cat(ts) for ts in list(zip(*wanted))[1:]))
        decoded = dict(zip((w[0] for w in wanted), zip(rgb.split([len(w[1]) for w in wanted]),
                                                       mask.split([len(w[1]) for w in wanted]))))
        base = decoded["base"][0]

        def full(name: str, t: torch.Tensor) -> torch.Tensor:  # the decoded rows back in place, zeros elsewhere
            return t.new_zeros((x.shape[0], *t.shape[1:])).index_copy(0, rows[name], t)

        dropped = torch.maximum(full("a", decoded["a"][1]), full("b", decoded["b"][1]))
        removed = torch.where(_column(edit.soft), dropped * base + (1 - dropped) * x,
                              torch.where(dropped > _column(edit.threshold).to(dropped.dtype), base, x))
        rgb_new, mask_new = full("new", decoded["new"][0]), full("new", decoded["new"][1])
        pasted = mask_new * rgb_new + (1 - mask_new) * removed
        paste = _column(edit.paste)
        return torch.where(paste, pasted, removed), torch.where(paste, mask_new, dropped)

    def attribute_masks(self, codes: Codes, attribute: Attribute | torch.Tensor = "both") -> torch.Tensor:
        """(N, 1, S, S) masks in [0, 1] of the attribute(s) of images with these codes: the mask of
        G(c, sep_a, 0) for 'a', of G(c, 0, sep_b) for 'b', their elementwise maximum for 'both'."""
        if not self.config.has_mask:
            raise ValueError("this is a plain model: only mask-variant models predict attribute masks")
        n = codes.common.shape[0]
        drop_a, drop_b = self._drops(attribute, n, codes.common.device)
        sep_a = self._code(codes, "sep_a", drop_a, "the mask of attribute a")
        sep_b = self._code(codes, "sep_b", drop_b, "the mask of attribute b")
        zeros = torch.zeros_like(sep_a)
        _, mask = self.decode_parts(torch.cat([codes.common, codes.common]), torch.cat([sep_a, zeros]),
                                    torch.cat([zeros, sep_b]))
        return torch.maximum(mask[:n] * _column(drop_a), mask[n:] * _column(drop_b))

    def segment(self, x: torch.Tensor, attribute: Literal["auto", "a", "b", "both"] | torch.Tensor = "auto") -> torch.Tensor:
        """The weakly supervised segmentation of the mask paper: (N, 1, S, S) attribute masks in [0, 1] of images
        x. 'auto' segments the attribute of the domain each image is detected as. Plain models raise ValueError."""
        if not self.config.has_mask:
            raise ValueError("this is a plain model: segmentation needs a mask-variant model")
        auto = isinstance(attribute, str) and attribute == "auto"
        codes = self.encode(x, self.remove_parts(None if auto else attribute))
        return self.attribute_masks(codes, self.detect(codes) if auto else attribute)

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
            s = s.unsqueeze(1)  # (N, 1, C, H, W)
            p = s + t * (e.unsqueeze(1) - s) if i in moved else s.expand(-1, steps, -1, -1, -1)
            path.append(p.reshape(n * steps, *s.shape[2:]))
        return self.decode(*path).view(n, steps, 3, self.config.image_size, self.config.image_size)

    # --- helpers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _drops(attribute: Attribute | torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) bools (drop a, drop b) of 'a', 'b', 'both' or an (N,) tensor of 0 (a), 1 (b), 2 (both)."""
        if isinstance(attribute, str):
            if attribute not in ("a", "b", "both"):
                raise ValueError(f"attribute must be 'a', 'b' or 'both', not {attribute!r}")
            attribute = {"a": 0, "b": 1, "both": 2}[attribute]
        which = _flags(attribute, n, device, torch.long)
        return (which == 0) | (which == 2), (which == 1) | (which == 2)

    def _code(self, codes: Codes, field: str, used: torch.Tensor, what: str) -> torch.Tensor:
        """codes.<field>, or zeros where it was not computed and no row uses it (`used`: (N,) bool). A row that
        reads a code that was not computed is an error, never a silent zero."""
        t = getattr(codes, field)
        if t is not None:
            return t
        if bool(used.any()):
            part = {"common": "common", "sep_a": "a", "sep_b": "b"}[field]
            raise ValueError(f"{what} reads the {field} code, which was not computed (encode with {part!r} in parts)")
        like = next(t for t in codes if t is not None)
        return like.new_zeros((like.shape[0], self.config.sep_channels, *self.config.code_shape))

    def _edit(self, new: Codes, source: Codes, drop_a: torch.Tensor, drop_b: torch.Tensor, paste: torch.Tensor,
              threshold: torch.Tensor, soft: torch.Tensor) -> Edit:
        """An Edit whose codes are all tensors: a code that was not computed becomes zeros, after checking that no
        row reads it (a mask model's render reads the source's a and b codes where it drops them, the new codes
        where it pastes; a plain model's decodes the new codes alone)."""
        if source.common is None:
            raise ValueError("an edit reads the input's common code (its attribute-free decode)")
        reads = self.config.has_mask
        src = Codes(source.common, self._code(source, "sep_a", drop_a & reads, "removing attribute a"),
                    self._code(source, "sep_b", drop_b & reads, "removing attribute b"))
        pasted = Codes(new.common, self._code(new, "sep_a", paste, "pasting the edited codes"),
                       self._code(new, "sep_b", paste, "pasting the edited codes"))
        return Edit(pasted, src, drop_a, drop_b, paste, threshold, soft)

    def _target(self, target: int | str | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        if isinstance(target, str):
            target = self.config.domain_index(target)
        t = torch.as_tensor(target, device=device, dtype=torch.long)
        return t.expand(n) if t.ndim == 0 else t

    def _check_images(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (s, s):
            raise ValueError(f"expected images of shape (N, 3, {s}, {s}), got {tuple(x.shape)}")
