"""The one object that fully describes a model: everything needed to rebuild its networks from a model card."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Variant = Literal["plain", "mask"]
VARIANTS: tuple[str, ...] = ("plain", "mask")  # mask: the ICLR 2020 variant, whose decoder also predicts a mask
CommonInput = Literal["image", "contrast"]
COMMON_INPUTS: tuple[str, ...] = ("image", "contrast")  # what the common encoder reads (networks.contrast)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the encoders, decoder and latent discriminator.

    The defaults at 128 px are the published architecture: six stride-2 4x4 convolutions per encoder
    (32-64-128-256-512 then the code) down to a 2x2 map, separate codes of 25 channels (100 numbers), a common
    code of 512 - 2*25 = 462 channels, a decoder 512-512-256-128-64-32-3. Other power-of-two sizes add or drop
    one stride-2 layer per octave so the code map stays 2x2 (the published code breaks below 128 px): 32 px, the
    size of the digit domains (training/digits.py), has four.
    """

    image_size: int = 128
    base_width: int = 32  # channels of the first encoder layer; doubles per layer
    max_width: int = 512  # ... up to this cap
    code_channels: int = 512  # common + sep_a + sep_b channels of the 2x2 code map
    sep_channels: int = 25  # channels of each separate code
    common_map: int = 2  # side of the common code's map
    # side of each separate code's map: 2 (the published), or 1, one code for the whole image (the average of the
    # 2x2 map), which can say how an image looks but not where its shapes lie (the digit pairs: docs/research.md)
    separate_map: int = 2
    # the common encoder reads the image, or its contrast map (the digit pairs; the separate encoders then also read
    # each image's ground and stroke colours, which the contrast map leaves out)
    common_input: CommonInput = "image"
    disc_hidden: int = 512  # hidden units of the latent discriminator MLP
    variant: Variant = "plain"
    domain_a: str = "a"
    domain_b: str = "b"

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 32 or s > 256 or s & (s - 1):
            raise ValueError(f"image_size must be a power of two from 32 to 256, not {s}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.common_channels < 1:
            raise ValueError(f"code_channels ({self.code_channels}) must exceed 2 * sep_channels ({self.sep_channels})")
        if min(self.base_width, self.max_width, self.sep_channels, self.disc_hidden) < 1:
            raise ValueError("widths and code sizes must be positive")
        m = self.common_map
        if m < 2 or m & (m - 1) or m > s // 4:
            raise ValueError(f"common_map must be a power of two from 2 to image_size / 4 = {s // 4}, not {m}")
        if self.separate_map not in (1, 2):
            raise ValueError(f"separate_map must be 1 or 2, not {self.separate_map!r}")
        if self.common_input not in COMMON_INPUTS:
            raise ValueError(f"common_input must be one of {COMMON_INPUTS}, not {self.common_input!r}")
        if not self.domain_a or not self.domain_b or self.domain_a == self.domain_b:
            raise ValueError(f"domain names must be two different non-empty names, not {self.domain_a!r}/{self.domain_b!r}")

    @property
    def common_channels(self) -> int:
        return self.code_channels - 2 * self.sep_channels

    @property
    def num_layers(self) -> int:
        """Stride-2 layers from image_size down to the 2x2 code map: 4 at 32 px, 5 at 64, 6 at 128, 7 at 256."""
        return int(math.log2(self.image_size)) - 1

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """Encoder widths before the code layer (the decoder uses them reversed): 32, 64, 128, 256, 512 at 128 px."""
        return tuple(min(self.base_width * 2**i, self.max_width) for i in range(self.num_layers - 1))

    @property
    def code_shape(self) -> tuple[int, int]:
        """Spatial size of a separate code's map: 2x2, or 1x1 for a code of the whole image."""
        return (self.separate_map, self.separate_map)

    @property
    def common_shape(self) -> tuple[int, int]:
        """Spatial size of the common code's map: 2x2 (the published), or larger where the common code keeps the
        image's layout (the digit models: 8x8 at 32 px)."""
        return (self.common_map, self.common_map)

    def halvings(self, side: int) -> int:
        """Stride-2 layers from image_size down to a map of `side` (the rest of a net's layers keep the side)."""
        return self.num_layers - (side.bit_length() - 2)

    def part_shape(self, part: str) -> tuple[int, int, int]:
        """(C, H, W) of one image's code `part`: 'common', 'sep_a' or 'sep_b'."""
        if part == "common":
            return (self.common_channels, *self.common_shape)
        if part in ("sep_a", "sep_b"):
            return (self.sep_channels, *self.code_shape)
        raise ValueError(f"unknown code {part!r}: expected 'common', 'sep_a' or 'sep_b'")

    @property
    def sep_size(self) -> int:
        """Numbers in one separate code (100 for the published sizes)."""
        return self.sep_channels * self.separate_map**2

    @property
    def common_size(self) -> int:
        return self.common_channels * self.common_map**2

    @property
    def has_mask(self) -> bool:
        """Whether the decoder also predicts the attribute's mask (the mask-based variant)."""
        return self.variant == "mask"

    def domain_index(self, name: str) -> int:
        """0 for domain a, 1 for domain b, accepting 'a'/'b' or the domain's own name."""
        key = name.strip().lower()
        if key in ("a", self.domain_a.lower()):
            return 0
        if key in ("b", self.domain_b.lower()):
            return 1
        raise ValueError(f"unknown domain {name!r}: expected 'a', 'b', {self.domain_a!r} or {self.domain_b!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Rebuild from a card; unknown keys are refused so a card from a newer format is not silently misread."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, int]] = {
    # The published sizes (about 19 M parameters at 128 px): the default for CelebA and speed comparisons.
    "paper": dict(base_width=32, max_width=512, code_channels=512, sep_channels=25, disc_hidden=512),
    # Slim nets for the synthetic benchmark, the shipped weights and CPU training: 1.7 M parameters at 64 px,
    # 2.8 M (5.6 MB in fp16) at 128 px, so three pairs, a mask model and the judge fit the 25 MB weights budget.
    "slim": dict(base_width=16, max_width=128, code_channels=256, sep_channels=16, disc_hidden=256),
    # Tiny nets for tests.
    "tiny": dict(base_width=8, max_width=32, code_channels=32, sep_channels=4, disc_hidden=32),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A config from a named width preset, e.g. preset('slim', image_size=64, domain_a='smile')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
