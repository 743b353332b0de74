"""Each loss term through its declaration (`training/terms.py`), against the same quantity computed the long way
with the model's own inference methods, and the gradients it lets through."""
import pytest
import torch

from models import Codes
from models.config import preset
from training import terms
from training.loop import Trainer
from training.passes import PlainPass, noisy_common

PLAIN = {"recon_a": 1, "recon_b": 1, "zero": 1, "adversarial": 0.001}
MASK = {"recon_a": 7, "recon_b": 5, "zero": 1, "adversarial": 0.005, "mask_recon": 0.7}


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


def _trainer(weights: dict, variant: str = "plain", **kw) -> Trainer:
    """A trainer computing in float32 (no bf16 autocast), so each term can be checked to float tolerance."""
    torch.manual_seed(0)
    kw.setdefault("precision", "float32")
    trainer = Trainer(weights, preset("tiny", image_size=64, variant=variant), torch.device("cpu"), **kw)
    trainer.model.eval()  # in train mode every forward steps spectral norm's power iteration
    return trainer


def test_every_term_is_declared_once_with_a_formula() -> None:
    assert list(terms.TERMS)[:4] == ["recon_a", "recon_b", "zero", "adversarial"]
    for t in terms.TERMS.values():
        assert t.formula and set(t.variants) <= {"plain", "mask"}
    assert {t.name for t in terms.TERMS.values() if t.paper is None} == {
        "structure", "removal", "masked_removal", "translated_own", "translated_guide", "mask_sparsity", "neither",
        "neither_structure", "neither_zero", "neither_adversarial"}


def test_zero_and_reconstructions_pick_the_right_codes_and_images() -> None:
    z = torch.zeros(1, 1, 2, 2)
    ones = torch.ones(1, 3, 4, 4)
    out = PlainPass(Codes(z, z + 5, z + 2), Codes(z, z + 3, z + 7), ones * 0.5, ones * 0, None, None, None)
    s = terms.StepInputs(ones, ones, None, out, read=None)
    assert terms.TERMS["zero"].fn(s).item() == 5.0  # |E_sA(b)| = 3 plus |E_sB(a)| = 2
    assert terms.TERMS["recon_a"].fn(s).item() == 0.5 and terms.TERMS["recon_b"].fn(s).item() == 1.0


def test_masked_removal_charges_the_removal_through_the_mask() -> None:
    """The composite is the soft removal the model serves, and its gradient reaches the mask channel."""
    trainer = _trainer({**MASK, "masked_removal": 1}, "mask")
    a, b = _images(2, 1), _images(2, 2)
    s = trainer.forward(a, b)
    out = s.out
    removed = torch.cat([out.base_a * out.mask_a + (1 - out.mask_a) * a, out.base_b * out.mask_b + (1 - out.mask_b) * b])
    soft = trainer.model.remove(torch.cat([a, b]), torch.tensor([0, 1]).repeat_interleave(2), soft=True)
    torch.testing.assert_close(removed, soft, atol=1e-5, rtol=1e-4)
    value = terms.TERMS["masked_removal"].fn(s)
    with torch.no_grad():
        expected = trainer.model.enc_a(soft).abs().mean() + trainer.model.enc_b(soft).abs().mean()
    torch.testing.assert_close(value.detach(), expected, atol=1e-5, rtol=1e-4)
    value.backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0  # the mask channel's logits


def _translations(weights: dict):
    trainer = _trainer({**MASK, **weights}, "mask")
    a, b = _images(2, 3), _images(2, 4)
    s = trainer.forward(a, b)
    with torch.no_grad():
        ca, cb = trainer.model.encode(a), trainer.model.encode(b)
        t_a = trainer.model.decode(ca.common, torch.zeros_like(ca.sep_a), cb.sep_b)
        t_b = trainer.model.decode(cb.common, ca.sep_a, torch.zeros_like(cb.sep_b))
    return trainer, s, ca, cb, t_a, t_b


def test_the_pass_composites_translations_as_decode_renders_them() -> None:
    _, s, _, _, t_a, t_b = _translations({})
    torch.testing.assert_close(s.out.translated_a, t_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.out.translated_b, t_b, atol=1e-5, rtol=1e-4)


def test_translated_own_reads_the_contents_own_attribute_by_detached_encoders() -> None:
    trainer, s, _, _, t_a, t_b = _translations({"translated_own": 1})
    value = terms.TERMS["translated_own"].fn(s)
    with torch.no_grad():
        expected = trainer.model.enc_a(t_a).abs().mean() + trainer.model.enc_b(t_b).abs().mean()
    torch.testing.assert_close(value.detach(), expected, atol=1e-5, rtol=1e-4)
    detached = terms.StepInputs(s.a, s.b, None, type(s.out)(**{**vars(s.out), "translated_a": s.out.translated_a.detach(),
                                                                 "translated_b": s.out.translated_b.detach()}), s.read)
    assert not terms.TERMS["translated_own"].fn(detached).requires_grad  # the readers pass no gradient
    value.backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0  # through the translations' masks


def test_translated_guide_reads_the_guides_attribute_back_against_detached_targets() -> None:
    trainer, s, ca, cb, t_a, t_b = _translations({"translated_guide": 1})
    value = terms.TERMS["translated_guide"].fn(s)
    with torch.no_grad():
        expected = (trainer.model.enc_b(t_a) - cb.sep_b).abs().mean() + (trainer.model.enc_a(t_b) - ca.sep_a).abs().mean()
    torch.testing.assert_close(value.detach(), expected, atol=1e-5, rtol=1e-4)
    detached = terms.StepInputs(s.a, s.b, None, type(s.out)(**{**vars(s.out), "translated_a": s.out.translated_a.detach(),
                                                                 "translated_b": s.out.translated_b.detach()}), s.read)
    assert not terms.TERMS["translated_guide"].fn(detached).requires_grad  # readers and targets pass none
    value.backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0


def test_cycle_terms_compare_the_translations_codes_with_detached_targets() -> None:
    trainer, s, ca, cb, t_a, t_b = _translations({"cycle_a": 1, "cycle_b": 1})
    with torch.no_grad():
        ea, eb = trainer.model.encode(t_a), trainer.model.encode(t_b)
        want_a = (ea.common - ca.common).abs().mean() + (ea.sep_b - cb.sep_b).abs().mean()
        want_b = (eb.common - cb.common).abs().mean() + (eb.sep_a - ca.sep_a).abs().mean()
    torch.testing.assert_close(terms.TERMS["cycle_a"].fn(s).detach(), want_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms.TERMS["cycle_b"].fn(s).detach(), want_b, atol=1e-5, rtol=1e-4)


def test_mask_sparsity_is_the_mean_of_the_reconstructions_and_translations_masks() -> None:
    trainer, s, *_ = _translations({"mask_sparsity": 1})
    out = s.out
    expected = (out.mask_a.mean() + out.mask_b.mean() + torch.cat([out.trans_mask_a, out.trans_mask_b]).mean()) / 3
    torch.testing.assert_close(terms.TERMS["mask_sparsity"].fn(s), expected)


def test_removal_reads_the_separate_encoders_without_training_them() -> None:
    """The gradient reaches the decoder and the common encoder, never the separate encoders that judge."""
    trainer = _trainer({**PLAIN, "removal": 1})
    s = trainer.forward(_images(2, 5), _images(2, 6))
    expected = trainer.model.decode(torch.cat([s.out.codes_a.common, s.out.codes_b.common]))
    torch.testing.assert_close(torch.cat([s.out.removed_a, s.out.removed_b]), expected)
    value = terms.TERMS["removal"].fn(s)
    with torch.no_grad():
        want = trainer.model.enc_a(expected).abs().mean() + trainer.model.enc_b(expected).abs().mean()
    torch.testing.assert_close(value.detach(), want, atol=1e-5, rtol=1e-4)
    value.backward()
    separate = [p for enc in (trainer.model.enc_a, trainer.model.enc_b) for p in enc.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in separate)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.enc_common.parameters())
    assert _trainer(PLAIN).forward(_images(2, 5), _images(2, 6)).out.removed_a is None  # decoded only when read


def test_common_noise_is_relative_to_each_codes_size_and_reaches_only_the_decodes() -> None:
    common = torch.randn(2, 64, 2, 2) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    assert noisy_common(common, 0.0) is common
    torch.manual_seed(0)
    noise = noisy_common(common, 0.5) - common
    rms = common.pow(2).mean(dim=(1, 2, 3)).sqrt()
    ratio = noise.flatten(1).std(1) / (0.5 * rms)  # a code ten times larger gets ten times the noise
    assert torch.allclose(ratio, torch.ones(2), atol=0.25), ratio
    trainer = _trainer(PLAIN, common_noise=1.0)
    a = _images(2, 7)
    s = trainer.forward(a, _images(2, 8))
    clean = trainer.model.encode(a)
    torch.testing.assert_close(s.out.codes_a.common, clean.common)  # the adversary sees the clean code
    assert not torch.allclose(s.out.recon_a, trainer.model.decode(clean.common, clean.sep_a))
    with pytest.raises(ValueError, match="common_noise"):
        _trainer(PLAIN, common_noise=-1.0)


def test_neither_terms_decode_with_both_separate_codes_zero() -> None:
    trainer = _trainer({**PLAIN, "neither": 1, "neither_structure": 1, "neither_zero": 1})
    a, b, n = _images(2, 9), _images(2, 10), _images(2, 11)
    s = trainer.forward(a, b, n)
    codes = trainer.model.encode(n)
    decoded = trainer.model.decode(codes.common)
    torch.testing.assert_close(s.out.neither.decoded, decoded)
    torch.testing.assert_close(terms.TERMS["neither"].fn(s), (decoded - n).abs().mean())
    torch.testing.assert_close(terms.TERMS["neither_zero"].fn(s), codes.sep_a.abs().mean() + codes.sep_b.abs().mean())
    assert 0 < terms.TERMS["neither_structure"].fn(s).item() < 2
    with pytest.raises(ValueError, match="neither"):
        trainer.step(a, b)


def test_the_neither_adversary_tells_three_groups_apart() -> None:
    trainer = _trainer({**PLAIN, "adversarial": 0, "neither_adversarial": 0.1, "neither": 1})
    assert trainer.disc.net[-1].out_features == 3 and trainer.metrics[-3:] == ("neither_adversarial", "disc", "loss")
    metrics = trainer.step(_images(2, 12), _images(2, 13), _images(2, 14))
    assert torch.isfinite(metrics).all()
    with pytest.raises(ValueError, match="neither"):
        trainer.step(_images(2, 12), _images(2, 13))


def test_the_step_sums_the_weighted_terms() -> None:
    weights = {**PLAIN, "zero": 2.0, "structure": 3.0}
    trainer = _trainer(weights)
    trainer.model.train()
    row = dict(zip(trainer.metrics, trainer.step(_images(2, 15), _images(2, 16)).tolist()))
    expected = row["recon_a"] + row["recon_b"] + 2 * row["zero"] + 3 * row["structure"] + 0.001 * row["adversarial"]
    assert row["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("removal", [False, True])
def test_plain_cycle_decodes_the_translations_and_compares_their_codes(removal: bool) -> None:
    """The plain variant's code cycle: the pass decodes G(c_a, 0, sB_b) and G(c_b, sA_a, 0) in the same decoder
    call (beside the removals when a term reads them) and re-encodes them; the terms equal the long way round."""
    trainer = _trainer({**PLAIN, "cycle_a": 1, "cycle_b": 0.5, **({"removal": 1} if removal else {})})
    a, b = _images(2, 3), _images(2, 4)
    s = trainer.forward(a, b)
    with torch.no_grad():
        ca, cb = trainer.model.encode(a), trainer.model.encode(b)
        zeros = torch.zeros_like(ca.sep_a)
        t_a, t_b = trainer.model.decode(ca.common, zeros, cb.sep_b), trainer.model.decode(cb.common, ca.sep_a, zeros)
        ea, eb = trainer.model.encode(t_a), trainer.model.encode(t_b)
        want_a = (ea.common - ca.common).abs().mean() + (ea.sep_b - cb.sep_b).abs().mean()
        want_b = (eb.common - cb.common).abs().mean() + (eb.sep_a - ca.sep_a).abs().mean()
        torch.testing.assert_close(s.out.translated_a, t_a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.out.translated_b, t_b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.out.recon_a, trainer.model.decode(ca.common, ca.sep_a, zeros), atol=1e-5, rtol=1e-4)
        if removal:
            torch.testing.assert_close(s.out.removed_b, trainer.model.decode(cb.common, zeros, zeros), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms.TERMS["cycle_a"].fn(s).detach(), want_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms.TERMS["cycle_b"].fn(s).detach(), want_b, atol=1e-5, rtol=1e-4)
    assert _trainer(PLAIN).forward(a, b).out.cycle_a is None  # decoded only when a term reads it
