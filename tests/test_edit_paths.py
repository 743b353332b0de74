"""Each edit computes only the codes and decodes it reads, and its answer equals the full computation: every code
of every input encoded, then the paper's formulas written out here, independently of `render`."""
from __future__ import annotations

import itertools

import pytest
import torch

from models import Codes, Disentangler, preset

N = 4
TARGETS = (None, 0, 1, "b", torch.tensor([0, 1, 1, 0]))
KEEPS = (False, True, torch.tensor([True, False, True, False]))
ATTRIBUTES = ("a", "b", "both", torch.tensor([0, 1, 2, 1]))


def _model(variant: str) -> Disentangler:
    torch.manual_seed(3)
    return Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses", variant=variant)).eval()


@pytest.fixture(scope="module", params=["plain", "mask"])
def model(request: pytest.FixtureRequest) -> Disentangler:
    return _model(request.param)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    return tuple(torch.rand(N, 3, 64, 64) * 2 - 1 for _ in range(3))


def _col(t: torch.Tensor | float | bool) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32).expand(N).reshape(N, 1, 1, 1)


def _full_edit(m: Disentangler, x: torch.Tensor, x_codes: Codes, new: Codes | None, drop_a, drop_b, threshold=0.1,
               soft=False) -> torch.Tensor:
    """The full computation of an edit of x: a plain model decodes `new`; a mask model removes x's dropped
    attributes inside their masks, then pastes G(new) through its mask (no paste when new is None)."""
    if not m.config.has_mask:
        return m.decode(*new)
    zero = torch.zeros_like(x_codes.sep_a)
    base, _ = m.decode_parts(x_codes.common, zero, zero)
    mask_a = m.decode_parts(x_codes.common, x_codes.sep_a, zero)[1]
    mask_b = m.decode_parts(x_codes.common, zero, x_codes.sep_b)[1]
    dropped = torch.maximum(mask_a * _col(drop_a), mask_b * _col(drop_b))
    removed = dropped * base + (1 - dropped) * x if soft else torch.where(dropped > threshold, base, x)
    if new is None:
        return removed
    rgb, mask = m.decode_parts(*new)
    return mask * rgb + (1 - mask) * removed


def _counting(m: Disentangler) -> tuple[dict[str, int], list]:
    seen = {"enc_common": 0, "enc_a": 0, "enc_b": 0, "decoder": 0}
    hooks = [getattr(m, k).register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, seen[k] + len(inp[0])))
             for k in seen]
    return seen, hooks


@pytest.mark.parametrize("target,keep,strength", list(itertools.product(TARGETS, KEEPS, (1.0, 0.6))))
def test_transfer_equals_the_full_computation(model, images, target, keep, strength):
    content, guide, _ = images
    with torch.inference_mode():
        c, g = model.encode(content), model.encode(guide)
        t = model.detect(g) if target is None else model._target(target, N, content.device)
        to_a, k = _col(t == 0), _col(keep)
        new = Codes(c.common, to_a * strength * g.sep_a + (1 - to_a) * k * c.sep_a,
                    (1 - to_a) * strength * g.sep_b + to_a * k * c.sep_b)
        keep_t = torch.as_tensor(keep).expand(N)
        want = _full_edit(model, content, c, new, (t == 1) & ~keep_t, (t == 0) & ~keep_t)
        got = model.transfer(content, guide, target, strength, keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_intersect_equals_the_full_computation(model, images):
    content, ga, gb = images
    with torch.inference_mode():
        c = model.encode(content)
        new = Codes(c.common, 0.8 * model.encode(ga).sep_a, 0.8 * model.encode(gb).sep_b)
        want = _full_edit(model, content, c, new, True, True)
        got = model.intersect(content, ga, gb, 0.8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attribute,soft", list(itertools.product(ATTRIBUTES, (False, True))))
def test_remove_and_segment_equal_the_full_computation(model, images, attribute, soft):
    x = images[0]
    which = torch.as_tensor({"a": 0, "b": 1, "both": 2}.get(attribute, attribute) if isinstance(attribute, str) else attribute).expand(N)
    drop_a, drop_b = (which == 0) | (which == 2), (which == 1) | (which == 2)
    with torch.inference_mode():
        codes = model.encode(x)
        new = Codes(codes.common, _col(~drop_a) * codes.sep_a, _col(~drop_b) * codes.sep_b)
        want = _full_edit(model, x, codes, None if model.config.has_mask else new, drop_a, drop_b, 0.3, soft)
        got = model.remove(x, attribute, 0.3, soft)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if model.config.has_mask:
            zero = torch.zeros_like(codes.sep_a)
            masks = torch.maximum(model.decode_parts(codes.common, codes.sep_a, zero)[1] * _col(drop_a),
                                  model.decode_parts(codes.common, zero, codes.sep_b)[1] * _col(drop_b))
            torch.testing.assert_close(model.segment(x, attribute), masks, atol=1e-6, rtol=1e-6)


def test_a_transfer_with_a_known_target_runs_only_the_encoders_and_decodes_it_reads(model, images):
    """Plain: E_c(content), E_sB(guide), one decode. Mask: also the content's own other code (its mask removes
    that attribute first) and three decodes (base, that mask, the pasted codes) instead of encoding everything."""
    content, guide, _ = images
    seen, hooks = _counting(model)
    try:
        with torch.inference_mode():
            model.transfer(content, guide, target="glasses")
            plain_counts = {"enc_common": N, "enc_a": 0, "enc_b": N, "decoder": N}
            mask_counts = {"enc_common": N, "enc_a": N, "enc_b": N, "decoder": 3 * N}
            assert seen == (mask_counts if model.config.has_mask else plain_counts)
            for k in seen:
                seen[k] = 0
            model.transfer(content, guide)  # detection reads both of the guide's codes
            per_encoder = 2 * N if model.config.has_mask else N  # a mask model also reads the content's own codes
            assert (seen["enc_a"], seen["enc_b"]) == (per_encoder, per_encoder)
    finally:
        for h in hooks:
            h.remove()


def test_partial_codes_are_none_and_an_edit_that_reads_a_missing_code_is_refused(model, images):
    content, guide, _ = images
    with torch.inference_mode():
        c = model.encode(content, ("common",))
        assert c.sep_a is None and c.sep_b is None and c.parts == {"common"}
        g = model.encode(guide, ("a",))
        with pytest.raises(ValueError, match="sep_b code, which was not computed"):
            model.transfer_edit(c, g, torch.ones(N, dtype=torch.long))
        with pytest.raises(ValueError, match="detecting the domain reads both"):
            model.detect(g)
        with pytest.raises(ValueError, match="parts must be among"):
            model.encode(content, ("hat",))
        assert Codes.cat([c, c]).common.shape[0] == 2 * N and Codes.cat([c, c]).sep_a is None
        with pytest.raises(ValueError, match="lack the sep_a code"):
            Codes.cat([c, model.encode(content)])


# --- fixed batch shapes for serving (models/compiled.py) -------------------------------------------------------------


def test_bucketed_networks_answer_as_the_plain_ones_and_see_only_bucket_sizes(images):
    from models import compiled

    for variant in ("plain", "mask"):
        plain, fixed = _model(variant), _model(variant)
        compiled.prepare(fixed, "buckets", max_rows=4)
        shapes: list[int] = []
        for name in compiled.NETS:
            getattr(fixed, name).net.register_forward_hook(lambda mod, inp, out: shapes.append(len(inp[0])))
        content, guide, _ = images
        with torch.inference_mode():
            for n in (1, 3, 4):
                torch.testing.assert_close(fixed.transfer(content[:n], guide[:n], target=1),
                                           plain.transfer(content[:n], guide[:n], target=1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fixed.remove(content[:3], "both"), plain.remove(content[:3], "both"), atol=1e-5, rtol=1e-5)
            big = torch.cat([content, guide, content])  # 12 rows > the encoders' largest bucket: run in chunks
            torch.testing.assert_close(fixed.encode(big).common, plain.encode(big).common, atol=1e-5, rtol=1e-5)
            assert compiled.warm(fixed) == 3 * 3 + 5  # encoders: 1, 2, 4; decoder: 1 .. 16
        assert set(shapes) <= {1, 2, 4, 8, 16}
    with pytest.raises(ValueError, match="mode must be"):
        compiled.prepare(_model("plain"), "fast", 4)


@pytest.mark.slow
def test_a_compiled_model_answers_as_the_eager_one(images, caplog):
    """torch.compile on the CPU (inductor, a C++ compiler), every shape compiled by the warm-up: the buckets of a
    batch of 16 are more shapes than dynamo compiles per frame by default, and none of them may fall back."""
    import logging
    import shutil

    from models import compiled

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    eager, fast = _model("plain"), _model("plain")
    compiled.prepare(fast, "compile", max_rows=16)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        assert compiled.warm(fast) == 3 * 5 + 7  # encoders: 1 .. 16; decoder: 1 .. 64
    assert not [r for r in caplog.records if "limit" in r.getMessage()], [r.getMessage() for r in caplog.records]
    content, guide, _ = images
    with torch.inference_mode():
        for n in (1, 3):
            torch.testing.assert_close(fast.transfer(content[:n], guide[:n], target=0),
                                       eager.transfer(content[:n], guide[:n], target=0), atol=1e-4, rtol=1e-4)
