"""The mask-based variant (Mokady et al., ICLR 2020): the decoder's mask head, the compositing edits, segmentation,
checkpoints and training of variant "mask"."""
from pathlib import Path

import pytest
import torch
from torch import nn

from models import Disentangler, Edit, load, preset, read_card, save
from training.loop import Trainer, initialise_from


def _mask_model(seed: int = 0) -> Disentangler:
    torch.manual_seed(seed)
    return Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses", variant="mask")).eval()


@pytest.fixture(scope="module")
def mask64() -> Disentangler:
    return _mask_model()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


class _SquareDecoder(nn.Module):
    """A stand-in decoder whose mask is 1 inside rows/columns 16-31 when the code's separate part is non-zero, and 0
    everywhere else; its RGB is a constant set by the common code, so every composite is known exactly."""

    def __init__(self, common_channels: int):
        super().__init__()
        self.common_channels = common_channels

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        n = code.shape[0]
        rgb = code[:, :1].mean((1, 2, 3)).tanh().view(n, 1, 1, 1).expand(n, 3, 64, 64)
        has_sep = (code[:, self.common_channels :].abs().flatten(1).sum(1) > 0).view(n, 1, 1, 1)
        square = torch.zeros(1, 1, 64, 64)
        square[..., 16:32, 16:32] = 1
        return torch.cat([rgb, square * has_sep], dim=1)


def test_decoder_head_and_parameter_shapes() -> None:
    plain = Disentangler(preset("tiny", image_size=64))
    mask = _mask_model()
    # the plain decoder keeps its names and its 3-channel layer (shipped checkpoints load); the mask one has 4
    assert plain.state_dict().keys() == mask.state_dict().keys()
    assert plain.decoder.to_rgb.weight.shape[1] == 3 and mask.decoder.to_rgb.weight.shape[1] == 4


@torch.no_grad()
def test_mask_in_unit_range_and_plain_has_none(mask64: Disentangler) -> None:
    c = mask64.encode(_images(3, 0))
    rgb, m = mask64.decode_parts(*c)
    assert rgb.shape == (3, 3, 64, 64) and m.shape == (3, 1, 64, 64)
    assert rgb.abs().max() <= 1 and m.min() >= 0 and m.max() <= 1
    plain = Disentangler(preset("tiny", image_size=64)).eval()
    assert plain.decode_parts(*plain.encode(_images(1, 0)))[1] is None


@torch.no_grad()
def test_decode_is_the_composite(mask64: Disentangler) -> None:
    c = mask64.encode(_images(3, 1))
    rgb, m = mask64.decode_parts(*c)
    base = mask64.decode_parts(c.common)[0]
    torch.testing.assert_close(mask64.decode(*c), m * rgb + (1 - m) * base)
    other = _images(3, 2)
    torch.testing.assert_close(mask64.decode(*c, base=other), m * rgb + (1 - m) * other)
    # with both separate codes zero the composite is the attribute-free decode itself
    torch.testing.assert_close(mask64.decode(c.common), base)


@torch.no_grad()
def test_transfer_keeps_the_input_outside_the_mask() -> None:
    model = _mask_model()
    model.decoder = _SquareDecoder(model.config.common_channels)
    content, guide = _images(2, 3), _images(2, 4)
    out = model.transfer(content, guide, target="a")
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:32, 16:32] = False
    # outside the mask: the content image's own pixels, exactly (not its reconstruction)
    assert torch.equal(out[..., outside], content[..., outside])
    # inside: the generator's RGB of the new codes
    c = model.encode(content)
    expected = c.common[:, :1].mean((1, 2, 3)).tanh().view(2, 1, 1)
    torch.testing.assert_close(out[:, :, 16:32, 16:32], expected.view(2, 1, 1, 1).expand(2, 3, 16, 16))


@torch.no_grad()
def test_transfer_formula(mask64: Disentangler) -> None:
    m = mask64
    content, guide = _images(2, 5), _images(2, 6)
    c, g = m.encode(content), m.encode(guide)
    base = m.decode_parts(c.common)[0]
    # a's attribute onto the content: first remove the content's b attribute (hard, 0.1), then paste
    mask_b = m.decode_parts(c.common, None, c.sep_b)[1]
    removed = torch.where(mask_b > 0.1, base, content)
    rgb, mask = m.decode_parts(c.common, g.sep_a, None)
    torch.testing.assert_close(m.transfer(content, guide, target="a"), mask * rgb + (1 - mask) * removed)
    # keep: nothing is removed; the content's own b code is decoded with the new a code
    rgb, mask = m.decode_parts(c.common, g.sep_a, c.sep_b)
    torch.testing.assert_close(m.transfer(content, guide, target=0, keep=True), mask * rgb + (1 - mask) * content)
    # per-image targets in one batch equal the per-target calls
    mixed = m.transfer(content, guide, target=torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[1:], m.transfer(content[1:], guide[1:], target=1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_remove_hard_and_soft(mask64: Disentangler) -> None:
    m = mask64
    x = _images(2, 7)
    c = m.encode(x)
    base = m.decode_parts(c.common)[0]
    mask_a = m.decode_parts(c.common, c.sep_a, None)[1]
    mask_b = m.decode_parts(c.common, None, c.sep_b)[1]
    torch.testing.assert_close(m.remove(x, "a"), torch.where(mask_a > 0.1, base, x))
    torch.testing.assert_close(m.remove(x, "b", threshold=0.4), torch.where(mask_b > 0.4, base, x))
    both = torch.maximum(mask_a, mask_b)
    torch.testing.assert_close(m.remove(x, "both", soft=True), both * base + (1 - both) * x)
    # a threshold of 1 removes nothing: the input comes back unchanged
    assert torch.equal(m.remove(x, "both", threshold=1.0), x)
    # per-image attributes equal the per-attribute calls
    mixed = m.remove(x, torch.tensor([0, 2]))
    torch.testing.assert_close(mixed, torch.cat([m.remove(x[:1], "a"), m.remove(x[1:], "both")]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_segment(mask64: Disentangler) -> None:
    m = mask64
    x = _images(3, 8)
    c = m.encode(x)
    mask_a = m.decode_parts(c.common, c.sep_a, None)[1]
    mask_b = m.decode_parts(c.common, None, c.sep_b)[1]
    torch.testing.assert_close(m.segment(x, "a"), mask_a)
    torch.testing.assert_close(m.segment(x, "both"), torch.maximum(mask_a, mask_b))
    auto = m.segment(x)
    detected = m.detect(c)
    for i in range(3):
        torch.testing.assert_close(auto[i], (mask_a if detected[i] == 0 else mask_b)[i])
    plain = Disentangler(preset("tiny", image_size=64)).eval()
    with pytest.raises(ValueError, match="plain model"):
        plain.segment(x)


@torch.no_grad()
def test_batched_edits_equal_single_edits(mask64: Disentangler) -> None:
    """The service renders the Edits of many requests as one concatenated Edit."""
    m = mask64
    x, guide = _images(2, 9), _images(2, 10)
    c, g = m.encode(x), m.encode(guide)
    edits = [m.transfer_edit(c.index(slice(0, 1)), g.index(slice(0, 1)), torch.tensor([1])),
             m.remove_edit(c.index(slice(1, 2)), "a", threshold=0.3, soft=True)]
    together, masks = m.render(x, Edit.cat(edits))
    for i, e in enumerate(edits):
        alone, mask = m.render(x[i : i + 1], e)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masks[i : i + 1], mask, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model = _mask_model(3)
    card_path = save(model, tmp_path / "mask")
    assert read_card(card_path)["variant"] == "mask"
    loaded = load(card_path)
    assert loaded.config == model.config and loaded.config.variant == "mask"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _images(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded.segment(x), model.segment(x))
        assert torch.equal(loaded.transfer(x, x.flip(0)), model.transfer(x, x.flip(0)))


MASK_WEIGHTS = {"recon_a": 7, "recon_b": 5, "zero": 1, "adversarial": 0.005, "mask_recon": 0.7, "cycle_b": 0.001}


def test_trainer_steps_are_finite() -> None:
    torch.manual_seed(0)
    trainer = Trainer(MASK_WEIGHTS, preset("tiny", image_size=64, variant="mask"), torch.device("cpu"))
    assert trainer.metrics == ("recon_a", "recon_b", "zero", "mask_recon", "cycle_b", "adversarial", "disc", "loss")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for step in range(3):
        metrics = trainer.step(_images(2, 20 + step), _images(2, 30 + step))
        assert metrics.shape == (len(trainer.metrics),) and not metrics.requires_grad
        assert torch.isfinite(metrics).all(), dict(zip(trainer.metrics, metrics.tolist()))
    # every parameter, the mask channel of the last layer too, was trained
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k, p in trainer.model.named_parameters() if k in before)


def test_init_starts_a_mask_model_from_a_plain_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    plain = Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")).eval()
    save(plain, tmp_path / "plain")
    fresh = _mask_model(seed=4)
    mask_channel = [t.clone() for t in (fresh.decoder.to_rgb.weight[:, 3:], fresh.decoder.to_rgb.bias[3:])]
    initialise_from(fresh, tmp_path / "plain")
    mine = fresh.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(mine[name] if value.shape == mine[name].shape else
                                   (mine[name][:3] if value.dim() == 1 else mine[name][:, :3]), value, msg=name)
    torch.testing.assert_close(fresh.decoder.to_rgb.weight[:, 3:], mask_channel[0])  # the mask channel stays fresh
    torch.testing.assert_close(fresh.decoder.to_rgb.bias[3:], mask_channel[1])
    x = _images(2, 5)
    with torch.no_grad():  # the RGB the mask model draws is the plain model's image
        torch.testing.assert_close(fresh.decode_parts(*fresh.encode(x))[0], plain.decode(*plain.encode(x)))


def test_init_refuses_a_checkpoint_of_other_sizes(tmp_path: Path) -> None:
    save(Disentangler(preset("tiny", image_size=128)), tmp_path / "big")
    with pytest.raises(ValueError, match=r"other sizes: image_size 128 \(this run: 64\)"):
        initialise_from(_mask_model(), tmp_path / "big")
