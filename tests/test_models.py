"""Shapes, round trips and the edit formulas of the Disentangler at every supported size."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models import Codes, Disentangler, ModelConfig, preset
from models.networks import (ChannelsLastInstanceNorm, DenseConv, LatentDiscriminator, UnfoldedConv, bake_spectral_norm,
                             colours, contrast, inference_ready)


@pytest.fixture(scope="module")
def tiny64() -> Disentangler:
    torch.manual_seed(0)
    return Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")).eval()


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_shapes_round_trip(size: int) -> None:
    cfg = preset("tiny", image_size=size)
    model = Disentangler(cfg).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        y = model.decode(*codes)
    assert codes.common.shape == (2, cfg.common_channels, 2, 2)
    assert codes.sep_a.shape == codes.sep_b.shape == (2, cfg.sep_channels, 2, 2)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert LatentDiscriminator(cfg)(codes.common).shape == (2,)
    assert LatentDiscriminator(cfg, groups=3)(codes.common).shape == (2, 3)


def test_latent_discriminator_is_not_lipschitz_bounded() -> None:
    """The published discriminator is two plain linear layers; the encoders keep their spectral norm."""
    model, disc = Disentangler(preset("tiny", image_size=64)), LatentDiscriminator(preset("tiny", image_size=64))
    assert not any(parametrize.is_parametrized(m) for m in disc.modules())
    assert parametrize.is_parametrized(model.enc_common.head)


def test_published_sizes() -> None:
    cfg = ModelConfig()
    assert cfg.hidden_widths == (32, 64, 128, 256, 512) and cfg.num_layers == 6
    assert cfg.common_channels == 462 and cfg.sep_size == 100
    params = sum(p.numel() for p in Disentangler(cfg).parameters())
    assert 18e6 < params < 21e6  # "about 19 M parameters"


def test_layers_per_size() -> None:
    """One stride-2 layer per octave down to the 2x2 code map: 32 px (the digits) has one fewer than 64."""
    assert [ModelConfig(image_size=s).num_layers for s in (32, 64, 128, 256)] == [4, 5, 6, 7]
    assert ModelConfig(image_size=32).hidden_widths == (32, 64, 128)


@pytest.mark.parametrize("bad", [16, 100, 512])
def test_rejects_bad_sizes(bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(image_size=bad)


def test_rejects_bad_input_shape(tiny64: Disentangler) -> None:
    with pytest.raises(ValueError, match="expected images"):
        tiny64.encode(torch.zeros(1, 3, 128, 128))


def test_domain_index_names() -> None:
    cfg = preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")
    assert [cfg.domain_index(n) for n in ("a", "B", "smile", "Glasses")] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="unknown domain"):
        cfg.domain_index("beard")


@torch.no_grad()
def test_transfer_matches_formula(tiny64: Disentangler) -> None:
    m = tiny64
    content, guide = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    c, g = m.encode(content), m.encode(guide)
    # a's attribute onto content, removing content's b attribute: G(E_c(c), E_sA(g), 0)
    torch.testing.assert_close(m.transfer(content, guide, target="a"), m.decode(c.common, g.sep_a, None))
    torch.testing.assert_close(m.transfer(content, guide, target=1), m.decode(c.common, None, g.sep_b))
    torch.testing.assert_close(m.transfer(content, guide, target="glasses", keep=True, strength=0.5),
                               m.decode(c.common, c.sep_a, 0.5 * g.sep_b))
    # per-image targets in one batch equal the per-target calls
    mixed = m.transfer(content, guide, target=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(mixed[1], m.transfer(content[1:2], guide[1:2], target=1)[0])
    torch.testing.assert_close(mixed[0], m.transfer(content[:1], guide[:1], target=0)[0])
    # detection picks the domain with the larger separate code
    detected = m.detect(g)
    torch.testing.assert_close(m.transfer(content, guide), m.transfer(content, guide, target=detected))


@torch.no_grad()
def test_intersect_remove_interpolate(tiny64: Disentangler) -> None:
    m = tiny64
    x, ga, gb = (torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(3))
    torch.testing.assert_close(m.intersect(x, ga, gb), m.decode(m.encode(x).common, m.encode(ga).sep_a, m.encode(gb).sep_b))
    c = m.encode(x)
    torch.testing.assert_close(m.remove(x, "both"), m.decode(c.common))
    torch.testing.assert_close(m.remove(x, "a"), m.decode(c.common, None, c.sep_b))
    torch.testing.assert_close(m.remove(x, torch.tensor([1, 2])), torch.stack([m.decode(c.common, c.sep_a)[0], m.decode(c.common)[1]]))
    e = m.encode(ga)
    path = m.interpolate(c, e, steps=5, space="a")
    assert path.shape == (2, 5, 3, 64, 64)
    torch.testing.assert_close(path[:, 0], m.decode(*c))
    torch.testing.assert_close(path[:, -1], m.decode(c.common, e.sep_a, c.sep_b))
    full = m.interpolate(c, e, steps=3, space="all")
    torch.testing.assert_close(full[:, -1], m.decode(*e))
    with pytest.raises(ValueError):
        m.interpolate(c, e, steps=3, space="nose")


@torch.no_grad()
def test_batched_equals_unbatched(tiny64: Disentangler) -> None:
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    whole = tiny64.reconstruct(x)
    one_by_one = torch.cat([tiny64.reconstruct(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=1e-5)


def test_codes_helpers() -> None:
    c = Codes(torch.zeros(4, 2, 2, 2), torch.ones(4, 1, 2, 2), torch.ones(4, 1, 2, 2))
    both = Codes.cat([c.index(slice(0, 1)), c.index(slice(1, None))])
    assert all(torch.equal(x, y) for x, y in zip(both, c))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_conv_is_the_convolution(transposed: bool, bias: bool) -> None:
    torch.manual_seed(1)
    conv = (nn.ConvTranspose2d(6, 5, 4, 2, 1, bias=bias) if transposed else nn.Conv2d(6, 5, 4, 2, 1, bias=bias)).eval()
    size = (2, 2) if transposed else (4, 4)
    dense = DenseConv(conv, size)
    x = torch.randn(3, 6, *size)
    with torch.no_grad():
        want = conv(x)
        assert torch.allclose(dense(x), want, atol=1e-5)
        out = dense(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(out, want, atol=1e-5) and out.is_contiguous(memory_format=torch.channels_last)
        assert dense(x).is_contiguous() and dense(x[:0]).shape == (0, *want.shape[1:])


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("side", [4, 7, 8])
def test_unfolded_conv_is_the_convolution(transposed: bool, bias: bool, side: int) -> None:
    """In float64 the windows' matrix product is the layer to rounding, in either memory format, any batch."""
    torch.manual_seed(1)
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = kind(6, 5, 4, 2, 1, bias=bias).double().eval()
    unfolded = UnfoldedConv(conv)
    x = torch.randn(3, 6, side, side, dtype=torch.float64)
    with torch.no_grad():
        want = conv(x)
        got = unfolded(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        out = unfolded(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert unfolded(x[:0]).shape == (0, *want.shape[1:])
    with pytest.raises(ValueError, match="4x4 stride-2"):
        UnfoldedConv(nn.Conv2d(6, 5, 3, 1, 1))


@pytest.mark.parametrize("side", [2, 4, 5])
def test_channels_last_instance_norm_is_the_instance_norm(side: int) -> None:
    """In float64 the in-place norm is InstanceNorm2d to rounding, in either memory format, any batch; bf16 within
    bf16 rounding of the float64 answer."""
    torch.manual_seed(4)
    norm = nn.InstanceNorm2d(6, affine=True).double().eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    fast = ChannelsLastInstanceNorm(norm)
    x = torch.randn(3, 6, side, side, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        want = norm(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = fast(x.contiguous(memory_format=fmt))
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
            assert got.is_contiguous(memory_format=fmt)
        assert fast(x[:0]).shape == (0, 6, side, side)
        half = ChannelsLastInstanceNorm(nn.InstanceNorm2d(6, affine=True).to(torch.bfloat16).eval())
        half.norm.load_state_dict({k: v.to(torch.bfloat16) for k, v in norm.state_dict().items()})
        got = half(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() <= 0.05
    with pytest.raises(ValueError, match="affine"):
        ChannelsLastInstanceNorm(nn.InstanceNorm2d(6))


def test_inference_ready_unfolds_the_wide_small_map_layers_in_bf16_only() -> None:
    """Paper widths at 64 px: each encoder's 8x8 -> 4x4 layer (256 channels out) is unfolded in bf16, and the bf16
    encoders answer as the baked bf16 ones do, to bf16 rounding; float32 keeps oneDNN's kernels there. The common
    code's head (462 channels out) is unfolded in both."""
    torch.manual_seed(3)
    cfg = preset("paper", image_size=64)
    state = Disentangler(cfg).eval().state_dict()

    def model(dtype: torch.dtype, ready: bool) -> Disentangler:
        m = Disentangler(cfg).eval()
        m.load_state_dict(state)
        m = bake_spectral_norm(m).to(dtype)
        return inference_ready(m) if ready else m

    in_f32 = [name for name, m in model(torch.float32, True).named_modules() if isinstance(m, UnfoldedConv)]
    assert in_f32 == ["enc_common.head"]
    ready, baked = model(torch.bfloat16, True), model(torch.bfloat16, False)
    unfolded = [name for name, m in ready.named_modules() if isinstance(m, UnfoldedConv)]
    assert unfolded == ["enc_common.body.3.0", "enc_common.head", "enc_a.body.3.0", "enc_b.body.3.0"]
    # bf16: the norms of maps up to 16x16 read channels_last maps in place (at 64 px all three: 16, 8 and 4)
    in_place = [name for name, m in ready.named_modules() if isinstance(m, ChannelsLastInstanceNorm)]
    assert [n for n in in_place if n.startswith("enc_common.")] == [f"enc_common.body.{i}.1" for i in (1, 2, 3)]
    at_128 = inference_ready(Disentangler(preset("paper", image_size=128)).eval().to(torch.bfloat16))
    assert not isinstance(at_128.enc_common.body[1][1], ChannelsLastInstanceNorm)  # its 32x32 map: built in
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        for channels_last in (False, True):
            if channels_last:
                ready.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            for w, g in zip(baked.encode(x), ready.encode(x)):
                w, g = w.float(), g.float()
                assert (g - w).abs().max() <= 0.03 * w.abs().max()


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "mask"])
def test_inference_ready_answers_as_the_trained_model(size: int, variant: str) -> None:
    """Baked and with the code-map layers as matrices, every network answers as the trained one does."""
    torch.manual_seed(2)
    cfg = preset("tiny", image_size=size, variant=variant)
    trained, ready = Disentangler(cfg).eval(), Disentangler(cfg).eval()
    ready.load_state_dict(trained.state_dict())
    inference_ready(ready)
    assert sum(isinstance(m, DenseConv) for m in ready.modules()) == 4  # three encoder heads, the decoder's first layer
    normed = [block for enc in (ready.enc_common, ready.enc_a, ready.enc_b) for block in enc.body[1:]]
    assert normed and all(isinstance(block[1], ChannelsLastInstanceNorm) for block in normed)  # float32: every one
    x = torch.rand(3, 3, size, size) * 2 - 1
    with torch.no_grad():
        for channels_last in (False, True):
            if channels_last:
                ready.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            want, got = trained.encode(x), ready.encode(x)
            for w, g in zip(want, got):
                assert torch.allclose(w, g, atol=1e-5)
            code = torch.cat(list(want), dim=1)
            assert torch.allclose(trained.decoder(code), ready.decoder(code), atol=1e-5)


@pytest.mark.parametrize("side", [4, 8])
def test_a_larger_common_map_keeps_the_layout(side: int) -> None:
    """common_map > 2: the common code is a (C, side, side) map (its encoder stops halving there, its later layers
    keep the side), the separate codes stay 2x2 and reach the decoder spread over their quarters; the edits,
    the discriminator and inference_ready work on it unchanged."""
    torch.manual_seed(3)
    cfg = preset("tiny", image_size=32, common_map=side)
    assert cfg.common_shape == (side, side) and cfg.code_shape == (2, 2)
    assert cfg.common_size == cfg.common_channels * side * side
    model = Disentangler(cfg).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.common.shape == (4, cfg.common_channels, side, side)
        assert codes.sep_a.shape == codes.sep_b.shape == (4, cfg.sep_channels, 2, 2)
        assert LatentDiscriminator(cfg)(codes.common).shape == (4,)
        # each separate-code cell reaches its quarter of the decoder's input map
        k = side // 2
        spread = codes.sep_b.repeat_interleave(k, 2).repeat_interleave(k, 3)
        direct = model.decoder(torch.cat([codes.common, torch.zeros_like(spread), spread], dim=1))
        assert torch.allclose(model.decode(codes.common, None, codes.sep_b), direct)
        moved = model.transfer(x[:2], x[2:], target=1)
        assert torch.allclose(moved, model.decode(codes.common[:2], None, codes.sep_b[2:]), atol=1e-6)
        assert model.interpolate(Codes(*(t[:2] for t in codes)), Codes(*(t[2:] for t in codes)), 3).shape == (2, 3, 3, 32, 32)
        ready = Disentangler(cfg).eval()
        ready.load_state_dict(model.state_dict())
        inference_ready(ready)
        assert isinstance(ready.enc_a.head, DenseConv) and not isinstance(ready.enc_common.head, DenseConv)
        for w, g in zip(codes, ready.encode(x)):
            assert torch.allclose(w, g, atol=1e-5)
        assert torch.allclose(model.decode(*codes), ready.decode(*codes), atol=1e-5)


def test_a_pooled_separate_code_is_one_code_of_the_whole_image() -> None:
    """separate_map=1: each separate code is the average of the encoder's 2x2 map (plus the colours, for a
    contrast-reading model), one (C, 1, 1) code that reaches every cell of the decoder's input; the edits and
    inference_ready work on it, the card keeps the setting, a card without it means 2x2, and other sides are refused."""
    torch.manual_seed(5)
    cfg = preset("tiny", image_size=32, common_map=8, common_input="contrast", separate_map=1)
    assert cfg.code_shape == (1, 1) and cfg.sep_size == cfg.sep_channels and cfg.part_shape("sep_b") == (cfg.sep_channels, 1, 1)
    model = Disentangler(cfg).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.sep_a.shape == codes.sep_b.shape == (4, cfg.sep_channels, 1, 1)
        grid = model.enc_b.head(model.enc_b.body(x))
        assert grid.shape[-2:] == (2, 2)
        torch.testing.assert_close(codes.sep_b, grid.mean((2, 3), keepdim=True) + model.enc_b.colour(colours(x))[:, :, None, None])
        spread = codes.sep_b.expand(-1, -1, 8, 8)
        direct = model.decoder(torch.cat([codes.common, torch.zeros_like(spread), spread], dim=1))
        torch.testing.assert_close(model.decode(codes.common, None, codes.sep_b), direct)
        moved = model.transfer(x[:2], x[2:], target=1)
        torch.testing.assert_close(moved, model.decode(codes.common[:2], None, codes.sep_b[2:]))
        ready = Disentangler(cfg).eval()
        ready.load_state_dict(model.state_dict())
        inference_ready(ready)
        for w, g in zip(codes, ready.encode(x)):
            assert torch.allclose(w, g, atol=1e-5)
    assert ModelConfig.from_dict(cfg.to_dict()).separate_map == 1
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "separate_map"}).code_shape == (2, 2)
    for bad in (0, 3, 4):
        with pytest.raises(ValueError, match="separate_map"):
            ModelConfig(image_size=32, separate_map=bad)


@pytest.mark.parametrize("bad", [1, 3, 16])
def test_rejects_bad_common_maps(bad: int) -> None:
    with pytest.raises(ValueError, match="common_map"):
        ModelConfig(image_size=32, common_map=bad)


def test_the_contrast_map_has_neither_colour_nor_polarity() -> None:
    """contrast(): a stroke's distance in colour from the image's ground, scaled to the image's own contrast: the
    same map for a light stroke on a dark ground, the dark stroke on a light ground, and any two colours; in [-1, 1],
    in every channel, in the input's dtype and layout."""
    stroke = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    stroke[..., 8:24, 14:18] = True  # a "1", an eighth of the pixels
    def paint(fg: tuple[float, float, float], bg: tuple[float, float, float]) -> torch.Tensor:
        return torch.where(stroke, torch.tensor(fg).view(1, 3, 1, 1), torch.tensor(bg).view(1, 3, 1, 1))

    white_on_black = contrast(paint((1.0, 1.0, 1.0), (-1.0, -1.0, -1.0)))
    assert white_on_black.shape == (1, 3, 32, 32) and white_on_black.min() == -1 and white_on_black.max() == 1
    assert torch.equal(white_on_black[:, 0][stroke[:, 0]], torch.ones(int(stroke.sum())))  # the stroke at 1, the ground at -1
    for fg, bg in (((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)), ((0.8, -0.6, -0.6), (-0.5, 0.4, -0.2)), ((0.1, 0.1, 0.9), (0.0, 0.0, 0.1))):
        torch.testing.assert_close(contrast(paint(fg, bg)), white_on_black)
    # what the map leaves out, `colours` gives: the ground's colour and the stroke's, exactly for a two-colour image
    for fg, bg in (((1.0, 1.0, 1.0), (-1.0, -1.0, -1.0)), ((0.8, -0.6, -0.6), (-0.5, 0.4, -0.2))):
        torch.testing.assert_close(colours(paint(fg, bg)), torch.tensor([[*bg, *fg]]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert colours(x).shape == (2, 6) and colours(x.to(torch.bfloat16)).dtype == torch.float32
    assert torch.equal(contrast(x)[:, 0], contrast(x)[:, 2])
    assert contrast(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert contrast(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    # the gradient into the image stays finite where pixels have the ground's colour exactly (the code cycle and the
    # removal terms back-propagate into decoded images through these maps)
    image = paint((0.8, -0.6, -0.6), (-0.5, 0.4, -0.2)).requires_grad_(True)
    (contrast(image).sum() + colours(image).sum()).backward()
    assert torch.isfinite(image.grad).all()


def test_common_input_contrast_feeds_the_common_encoder_alone() -> None:
    """common_input='contrast': E_c reads contrast(x), the separate encoders the image and its colours; the card
    keeps the setting, and an unknown reading is refused. With common_input='image' no encoder reads colours apart."""
    torch.manual_seed(4)
    cfg = preset("tiny", image_size=32, common_map=8, common_input="contrast")
    model = Disentangler(cfg).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert torch.allclose(codes.common, model.enc_common.head(model.enc_common.body(contrast(x))))
        # the separate encoders read the image and, through a linear layer, its ground and stroke colours
        assert torch.allclose(codes.sep_a, model.enc_a.head(model.enc_a.body(x))
                              + model.enc_a.colour(colours(x))[:, :, None, None], atol=1e-6)
        # a colour change the contrast map does not see leaves the common code, not the separate codes
        swapped = x[:, [2, 0, 1]]
        assert torch.allclose(model.encode(swapped, ("common",)).common, codes.common, atol=1e-5)
        assert not torch.allclose(model.encode(swapped, ("a",)).sep_a, codes.sep_a, atol=1e-3)
    assert ModelConfig.from_dict(cfg.to_dict()).common_input == "contrast"
    plain = Disentangler(preset("tiny", image_size=32, common_map=8))
    assert all(enc.colour is None for enc in (plain.enc_common, plain.enc_a, plain.enc_b)) and model.enc_common.colour is None
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "common_input"}).common_input == "image"
    with pytest.raises(ValueError, match="common_input"):
        ModelConfig(image_size=32, common_input="grey")
