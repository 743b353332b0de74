"""The synthetic face benchmark: determinism, domains, ground-truth edits and their masks, the training stream."""
from __future__ import annotations

import pytest
import torch

from training import synthetic as syn
from training.synthetic import (
    ATTRIBUTES, PAIRS, TEST_SEED, TRAIN_SEED, Faces, SyntheticPairs, attribute_masks, pair_domain, render,
    render_domain, render_with_masks, sample_domain, sample_faces,
)


def _same_faces(x: Faces, y: Faces) -> bool:
    pairs = ((x.common, y.common), (x.style, y.style), (x.present, y.present))
    return all(dx.keys() == dy.keys() and all(torch.equal(dx[k], dy[k]) for k in dx) for dx, dy in pairs)


def test_faces_are_a_function_of_seed_and_index_only():
    rng = torch.get_rng_state()
    idx = torch.arange(24)
    whole = render(sample_faces(idx), 64)
    # Other batch compositions and orders, another call: the same pixels, bit for bit.
    for sub in ([5], [23, 5, 0, 11], list(range(7, 20))):
        assert torch.equal(render(sample_faces(sub), 64), whole[sub])
    assert _same_faces(sample_faces(idx), sample_faces(idx.tolist()))
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must not be touched"


def test_seeds_give_different_faces():
    a, b = sample_faces(range(8), seed=TRAIN_SEED), sample_faces(range(8), seed=TEST_SEED)
    assert not torch.equal(a.common["skin"], b.common["skin"])
    assert not torch.equal(render(a, 64), render(b, 64))
    # Factors vary from face to face and hit every hair style.
    many = sample_faces(range(400))
    assert set(many.common["hair_style"].tolist()) == set(range(len(syn.HAIR_STYLES)))
    assert 0.3 < many.present["glasses"].float().mean() < 0.7


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_and_range(size):
    faces = sample_faces(range(3))
    images, masks = render_with_masks(faces, size)
    assert images.shape == (3, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, render(faces, size))
    assert set(masks) == set(ATTRIBUTES)
    for m in masks.values():
        assert m.shape == (3, 1, size, size) and m.min() >= 0 and m.max() <= 1


def test_same_face_at_every_size():
    faces = sample_faces(range(4))
    small = render(faces, 64)
    big = torch.nn.functional.avg_pool2d(render(faces, 256), 4)
    assert (small - big).abs().mean() < 0.03


def test_unsupported_size():
    faces = sample_faces([0])
    calls = (lambda: render(faces, 100), lambda: attribute_masks(faces, 32), lambda: SyntheticPairs("beard_smile", 100))
    for call in calls:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_domain_presence_and_masks(pair):
    x, y = PAIRS[pair]
    (third,) = set(ATTRIBUTES) - {x, y}
    assert pair_domain(pair, "a") == {x: True, y: False, third: False}
    assert pair_domain(pair, "b") == {x: False, y: True, third: False}
    for domain, on in (("a", x), ("b", y)):
        faces = sample_domain(pair, domain, range(6), seed=TEST_SEED)
        masks = attribute_masks(faces, 64)
        for name in ATTRIBUTES:
            assert bool(faces.present[name].all()) if name == on else not bool(faces.present[name].any())
            per_face = masks[name].flatten(1).amax(1)
            assert bool((per_face > 0.99).all()) if name == on else bool((per_face == 0).all())
        assert torch.equal(render_domain(pair, domain, range(6), size=64, seed=TEST_SEED), render(faces, 64))
    with pytest.raises(ValueError):
        pair_domain("smile_beard", "a")
    with pytest.raises(ValueError):
        pair_domain(pair, "c")


@pytest.mark.parametrize("name", ATTRIBUTES)
@pytest.mark.parametrize("how", ["add", "remove", "copy"])
def test_edit_changes_pixels_only_inside_the_masks(name, how):
    """The ground truth of an edit differs from its source only where the masks of the edited attribute (of the
    source or of the edit) are non-zero; and the edit does change pixels."""
    src = sample_faces(range(40), seed=TEST_SEED)
    value = {"add": True, "remove": False, "copy": sample_faces(range(100, 140), seed=TEST_SEED)}[how]
    edited = src.edit(**{name: value})
    for size in (64, 128):
        before, masks_before = render_with_masks(src, size)
        after, masks_after = render_with_masks(edited, size)
        changed = (after - before).abs().amax(1, keepdim=True) > 1e-3
        allowed = (masks_before[name] > 0) | (masks_after[name] > 0)
        assert not bool((changed & ~allowed).any())
        assert int(changed.sum()) > 0.3 * int(allowed.sum())  # the masks are not vastly bigger than the change


def test_edit_of_several_attributes():
    a, b = sample_faces(range(16), seed=TEST_SEED), sample_faces(range(16, 32), seed=TEST_SEED)
    truth = b.edit(glasses=a, smile=False)  # b's face with a's glasses and no smile
    before, m_before = render_with_masks(b, 64)
    after, m_after = render_with_masks(truth, 64)
    allowed = torch.zeros_like(m_before["glasses"], dtype=torch.bool)
    for name in ("glasses", "smile"):
        allowed |= (m_before[name] > 0) | (m_after[name] > 0)
    assert not bool(((after - before).abs().amax(1, keepdim=True) > 1e-3)[~allowed].any())


def test_smile_mask_covers_the_neutral_mouth():
    """Removing a smile redraws the neutral mouth, so the smile's mask covers both shapes."""
    faces = sample_faces(range(16), present={"smile": False, "beard": False, "glasses": False})
    no_mouth = Faces({**faces.common, "mouth_y": torch.full((16,), 5.0)}, faces.style, faces.present)  # mouth off-image
    neutral_mouth = (render(faces, 64) - render(no_mouth, 64)).abs().amax(1, keepdim=True) > 1e-3
    assert bool(neutral_mouth.flatten(1).any(1).all())
    mask = attribute_masks(faces.edit(smile=True), 64)["smile"]
    assert bool((mask[neutral_mouth] > 0).all())
    assert not bool(attribute_masks(faces, 64)["smile"].any())


def test_edit_semantics():
    src = sample_faces(range(8))
    other = sample_faces(range(50, 58))
    off = src.edit(glasses=False)
    assert not bool(off.present["glasses"].any())
    on = src.edit(glasses=True)
    assert bool(on.present["glasses"].all())
    assert all(torch.equal(on.style[k], src.style[k]) for k in on.style)  # own style kept
    copied = src.edit(beard=other)
    assert torch.equal(copied.present["beard"], other.present["beard"])
    for k, v in copied.style.items():
        assert torch.equal(v, (other if k.startswith("beard_") else src).style[k])
    for name in ("glasses", "smile"):
        assert torch.equal(copied.present[name], src.present[name])
    assert all(torch.equal(copied.common[k], src.common[k]) for k in src.common)
    mixed = src.edit(smile=torch.tensor([True, False] * 4))
    assert mixed.present["smile"].tolist() == [True, False] * 4
    # The source is untouched.
    assert _same_faces(src, sample_faces(range(8)))
    with pytest.raises(ValueError):
        src.edit(hat=True)
    with pytest.raises(ValueError):
        src.edit(glasses=sample_faces(range(3)))


def test_index_and_to():
    faces = sample_faces(range(10))
    assert len(faces) == 10 and len(faces.index(3)) == 1
    assert _same_faces(faces.index([2, 7]), sample_faces([2, 7]))
    assert _same_faces(faces.index(slice(4, 6)), sample_faces([4, 5]))
    assert _same_faces(faces.index(torch.tensor([9, 0])), sample_faces([9, 0]))
    assert _same_faces(faces.to("cpu"), faces)


def test_present_overrides():
    faces = sample_faces(range(6), present={"beard": True, "smile": torch.tensor([1, 0, 1, 0, 1, 0]).bool()})
    assert bool(faces.present["beard"].all()) and faces.present["smile"].tolist() == [True, False] * 3
    assert torch.equal(faces.present["glasses"], sample_faces(range(6)).present["glasses"])


def test_windows_never_clip_a_shape(monkeypatch):
    """Layers are computed in fixed windows of the image; at the extremes of every pose and shape factor they
    must give exactly what computing them over the whole image gives."""
    faces = sample_faces(range(256), seed=3, present={name: True for name in ATTRIBUTES})
    g = torch.Generator().manual_seed(0)

    def extreme(lo, hi):
        return torch.where(torch.rand(len(faces), generator=g) < 0.5, torch.tensor(lo), torch.tensor(hi))

    c = faces.common
    c["pos_x"] = extreme(-syn.POSE_SHIFT[0], syn.POSE_SHIFT[0])
    c["pos_y"] = extreme(-syn.POSE_SHIFT[1], syn.POSE_SHIFT[1])
    c["angle"], c["size"] = extreme(-syn.POSE_ANGLE, syn.POSE_ANGLE), extreme(*syn.POSE_SCALE)
    c["face_w"], c["face_h"], c["jaw"] = extreme(*syn.FACE_W), extreme(*syn.FACE_H), extreme(*syn.JAW)
    c["hair_volume"] = torch.full((len(faces),), 0.03)
    faces.style["beard_coverage"] = extreme(0.0, 1.0)
    faces.style["beard_volume"] = torch.full((len(faces),), 0.04)
    windowed, masks = render_with_masks(faces, 64)
    monkeypatch.setattr(syn, "_FULL_WINDOWS", True)
    full, full_masks = render_with_masks(faces, 64)
    assert torch.equal(windowed, full)
    assert all(torch.equal(masks[k], full_masks[k]) for k in ATTRIBUTES)


def test_stream_describes_itself():
    sp = SyntheticPairs("beard_glasses", image_size=64)
    assert sp.domains == ("beard", "glasses") and sp.image_size == 64
    assert sp.describe() == {"kind": "synthetic", "pair": "beard_glasses", "seed": TRAIN_SEED, "image_size": 64}
    with pytest.raises(ValueError):
        SyntheticPairs("glasses_hat")


def test_stream_batches_follow_the_domains(monkeypatch):
    monkeypatch.setitem(syn._CALL_PIXELS, "cpu", 1)
    a, b = next(SyntheticPairs("smile_glasses", image_size=64).batches(4, seed=1))
    assert a.shape == b.shape == (4, 3, 64, 64)
    sp = SyntheticPairs("smile_glasses", image_size=64)
    ia, ib = sp.indices(4, 0, seed=1)
    assert torch.equal(a, render_domain("smile_glasses", "a", ia, size=64))
    assert torch.equal(b, render_domain("smile_glasses", "b", ib, size=64))
    assert not bool(torch.isin(ia, ib).any())  # a and b are different people


def test_stream_resumes_exactly(monkeypatch):
    monkeypatch.setitem(syn._CALL_PIXELS, "cpu", 3 * 2 * 4 * 64 * 64)  # three steps per render call
    sp = SyntheticPairs("beard_smile", image_size=64)
    run = sp.batches(4, seed=5)
    first = [next(run) for _ in range(5)]
    resumed = next(sp.batches(4, seed=5, start_step=3))
    assert torch.equal(resumed[0], first[3][0]) and torch.equal(resumed[1], first[3][1])
    # How many steps share one render call changes nothing.
    monkeypatch.setitem(syn._CALL_PIXELS, "cpu", 1)
    one_per_call = sp.batches(4, seed=5)
    for want in first:
        got = next(one_per_call)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Another run seed is another stream.
    assert not torch.equal(next(sp.batches(4, seed=6))[0], first[0][0])


def test_ranks_see_disjoint_faces(monkeypatch):
    monkeypatch.setitem(syn._CALL_PIXELS, "cpu", 1)
    sp = SyntheticPairs("smile_glasses", image_size=64)
    seen = []
    for step in range(3):
        for rank in range(2):
            seen += [i for part in sp.indices(8, step, seed=0, rank=rank, world_size=2) for i in part.tolist()]
    assert len(seen) == len(set(seen)) == 3 * 2 * 2 * 8
    a0, _ = next(sp.batches(8, rank=0, world_size=2))
    a1, _ = next(sp.batches(8, rank=1, world_size=2))
    assert not torch.equal(a0, a1)
    with pytest.raises(ValueError):
        next(sp.batches(8, rank=2, world_size=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    faces = sample_faces(range(16))
    cpu = render(faces, 128)
    gpu = render(sample_faces(torch.arange(16, device="cuda")), 128)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


def test_neither_stream_has_no_attribute_other_people_and_resumes_exactly():
    sp = SyntheticPairs("smile_glasses", image_size=64)
    run = sp.neither_batches(4, seed=2)
    first = [next(run) for _ in range(3)]
    (idx,) = sp.indices(4, 1, seed=2, streams=("neither",))
    faces = sample_faces(idx, TRAIN_SEED)
    assert torch.equal(first[1], render(faces.edit(**{name: False for name in ATTRIBUTES}), 64))
    assert torch.equal(next(sp.neither_batches(4, seed=2, start_step=2)), first[2])
    ia, ib = sp.indices(4, 1, seed=2)
    assert not bool(torch.isin(idx, torch.cat([ia, ib])).any())  # a third group of people
    masks = attribute_masks(faces.edit(**{name: False for name in ATTRIBUTES}), 64)
    assert all(float(m.sum()) == 0 for m in masks.values())  # no smile, glasses or beard anywhere
