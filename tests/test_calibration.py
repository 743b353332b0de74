"""The out-of-domain calibration: the reconstruction error against a hand computation, the score and verdict
arithmetic, the card round trip and `did calibrate`, and the bundled cards' verdicts on rendered test faces and on
real photographs.

`python -m tests.test_calibration` prints the scores docs/evaluation.md reports ("Out-of-domain inputs")."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from models import Disentangler, calibration, checkpoint, preset
from models.calibration import Calibration, reconstruction_error
from models.disentangler import Codes
from models.images import fit, load_rgb, to_tensor
from training.calibration import calibrate_checkpoint, card_images, synthetic_images
from training.cli import main
from training.synthetic import TEST_SEED

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(p.with_suffix("") for p in (ROOT / "weights").glob("*.json"))
SYNTHETIC = {"kind": "synthetic", "pair": "smile_glasses", "seed": 0, "image_size": 64}
TEST_FACES = 300  # rendered test-distribution faces per bundled model: a third each of domain a, b and neither
# Face crops (left, top, right, bottom) framed like the benchmark's faces: the face about half the square's width.
FACE_CROPS = {"astronaut": (116, 25, 336, 245), "grace_hopper": (52, 40, 472, 460)}


def _tiny(seed: int, **overrides) -> Disentangler:
    torch.manual_seed(seed)
    cfg = preset("tiny", image_size=64, domain_a="smile", domain_b="glasses").replace(**overrides)
    return Disentangler(cfg).eval()


def _hand_error(model: Disentangler, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction error written out from the decoder's outputs, one image at a time."""
    out = []
    for img in x:
        img = img[None]
        c, a, b = model.enc_common(img), model.enc_a(img), model.enc_b(img)
        raw = model.decoder(torch.cat([c, a, b], 1))
        if model.config.has_mask:
            base = model.decoder(torch.cat([c, torch.zeros_like(a), torch.zeros_like(b)], 1))[:, :3]
            recon = raw[:, 3:] * raw[:, :3] + (1 - raw[:, 3:]) * base
        else:
            recon = raw
        out.append(((recon - img) ** 2).sum() / img.numel())
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["plain", "mask"])
def test_reconstruction_error_is_the_mse_of_reconstruct(variant: str) -> None:
    model = _tiny(0, variant=variant)
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = _hand_error(model, x)
        err = reconstruction_error(model, x)
    assert err.dtype == torch.float32 and err.device.type == "cpu" and err.shape == (5,)
    torch.testing.assert_close(err, expected, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        codes = model.encode(x)
    torch.testing.assert_close(reconstruction_error(model, x, codes), err, rtol=1e-5, atol=1e-8)
    # codes given are used (a changed code changes the error), missing ones are encoded
    partial = Codes(codes.common, None, None)
    torch.testing.assert_close(reconstruction_error(model, x, partial), err, rtol=1e-5, atol=1e-8)
    changed = Codes(codes.common, codes.sep_a + 1, codes.sep_b)
    assert not torch.allclose(reconstruction_error(model, x, changed), err)
    # the model's own dtype: float64 networks, float32 answer
    assert torch.allclose(reconstruction_error(model.double(), x).double(), expected.double(), rtol=1e-4)
    assert reconstruction_error(model, x).dtype == torch.float32
    with pytest.raises(ValueError, match="expected images of shape"):
        reconstruction_error(model, x[:, :, :32, :32])


def _calibration(**changes) -> Calibration:
    fields = dict(data=dict(SYNTHETIC), n=1000,
                  percentiles={"p50": 0.01, "p90": 0.015, "p99": 0.02, "p99.9": 0.025, "max": 0.03},
                  margin=2.0, threshold=0.05)
    return Calibration(**{**fields, **changes})


def test_score_is_relative_to_p99_and_the_verdict_is_above_the_threshold() -> None:
    cal = _calibration()
    errors = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.0500001, 0.2])
    torch.testing.assert_close(cal.score(errors), torch.tensor([0.0, 0.5, 1.0, 2.5, 2.500005, 10.0]))
    assert cal.out_of_domain(errors).tolist() == [False, False, False, False, True, True]
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_card({"name": "x"}) is None
    with pytest.raises(models.CheckpointError, match="not a calibration record"):
        Calibration.from_card({"name": "x", "calibration": {"percentiles": {}}})
    with pytest.raises(ValueError, match="percentiles"):
        _calibration(percentiles={"p50": 0.01})


def test_calibrate_takes_percentiles_of_every_error_and_sets_the_threshold_at_twice_p99_9(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "reconstruction_error", lambda model, x: x.float())  # batches of errors
    errors = torch.arange(1, 2001, dtype=torch.float64) / 1e4
    cal = calibration.calibrate(_tiny(0), errors.split(300), {"kind": "synthetic"})
    assert cal.n == 2000 and cal.data == {"kind": "synthetic", "dtype": "float32"}
    expected = torch.quantile(errors, torch.tensor([0.5, 0.9, 0.99, 0.999, 1.0], dtype=torch.float64))
    assert list(cal.percentiles.values()) == pytest.approx(expected.tolist(), rel=1e-6)
    assert cal.percentiles["max"] == pytest.approx(0.2)
    assert cal.threshold == pytest.approx(2 * cal.percentiles["p99.9"]) and cal.margin == calibration.MARGIN == 2.0
    assert "2 x p99.9" in cal.rule


def test_calibrate_and_write_keep_the_card_readable_and_the_tensors_pinned(tmp_path: Path) -> None:
    path = models.save(_tiny(1, variant="mask"), tmp_path / "m", training={"data": SYNTHETIC})
    tensors = tmp_path / "m.safetensors"
    before, card_before = checkpoint.sha256(tensors), checkpoint.read_card(path)
    card_path, cal = calibrate_checkpoint(tmp_path / "m", n=31, batch_size=8)
    assert card_path == path and checkpoint.sha256(tensors) == before
    stored = checkpoint.read_checkpoint(path)  # the sha256 pin still holds
    card = stored.card
    assert {k: v for k, v in card.items() if k != "calibration"} == card_before
    assert Calibration.from_card(card).to_dict() == card["calibration"] == cal.to_dict()
    assert card["calibration"]["measured_on"] == {**SYNTHETIC, "indices": {"a": [0, 11], "b": [11, 21], "neither": [21, 31]},
                                                  "dtype": "float32", "n": 31}
    assert models.load(tmp_path / "m").config.variant == "mask"
    again = calibrate_checkpoint(tmp_path / "m", n=31, batch_size=31)[1]  # deterministic, whatever the batching
    assert again.percentiles == pytest.approx(cal.percentiles, rel=1e-5)


def test_a_calibration_read_back_from_its_record_states_the_same_rule() -> None:
    """The card stores the threshold to 7 decimals and the rule beside it; a record read back and written again
    is the same record for thresholds whose 6-digit rounding sits at a tie after that (0.91902549... rounds
    down unrounded and up once stored as 0.9190255)."""
    p = {"p50": 0.1, "p90": 0.2, "p99": 0.3, "p99.9": 0.46, "max": 0.5}
    thresholds = [0.9190255 - 1e-9, 0.9190255 + 1e-9, *(0.01 + i * 0.00012345679 for i in range(20000))]
    for t in thresholds:
        written = Calibration({}, 10, p, 2.0, t).to_dict()
        assert Calibration.from_dict(written).to_dict() == written, t


def test_calibration_images_follow_the_cards_training_data(tmp_path: Path) -> None:
    from tests.celeba_fixture import make_celeba
    from training.data import CelebAPairs, ImageFolderPairs

    record, batches = card_images({"name": "m", "config": {"image_size": 64}, "training": {"data": SYNTHETIC}}, 10, 4)
    images = torch.cat(list(batches))
    assert images.shape == (10, 3, 64, 64) and record["indices"] == {"a": [0, 4], "b": [4, 7], "neither": [7, 10]}
    dirs = tmp_path / "fa", tmp_path / "fb"
    for i, d in enumerate(dirs):
        d.mkdir()
        for j in range(3):
            Image.new("RGB", (80, 90), (40 * i + 10 * j, 90, 200)).save(d / f"{j}.png")
    folders = ImageFolderPairs(*dirs, image_size=64).describe()
    record, batches = card_images({"config": {"image_size": 64}, "training": {"data": folders}}, 10)
    images = torch.cat(list(batches))
    assert images.shape == (6, 3, 64, 64) and record["per_domain"] == {"fa": 3, "fb": 3}
    torch.testing.assert_close(images[3], ImageFolderPairs(*dirs, image_size=64).image(1, 0))
    make_celeba(tmp_path / "celeba")
    celeba = CelebAPairs(tmp_path / "celeba", "smile_glasses", image_size=64).describe()
    record, batches = card_images({"config": {"image_size": 64}, "training": {"data": celeba}}, 6)
    assert torch.cat(list(batches)).shape == (6, 3, 64, 64)
    assert record["per_domain"] == {"smile": 3, "glasses": 3} and record["split"] == "train"
    with pytest.raises(ValueError, match="no training data record"):
        card_images({"name": "m", "config": {"image_size": 64}, "training": {}})


def test_did_calibrate_and_did_export_write_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models.save(_tiny(2), tmp_path / "run" / "model", training={"data": SYNTHETIC})
    assert main(["calibrate", "--model", str(tmp_path / "run"), "--n", "12", "--device", "cpu"]) == 0
    assert "2 x p99.9" in capsys.readouterr().out
    assert checkpoint.read_card(tmp_path / "run")["calibration"]["measured_on"]["n"] == 12
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "w" / "m"), "--dtype", "float16", "--calibration-n", "9"]) == 0
    card = checkpoint.read_card(tmp_path / "w" / "m")
    assert card["calibration"]["measured_on"]["n"] == 9 and card["tensors"]["dtype"] == "float16"
    assert main(["calibrate", "--model", str(tmp_path / "run"), "--n", "1"]) == 2
    assert "n >= 2" in capsys.readouterr().err


# --- the bundled checkpoints ----------------------------------------------------------------------------------


def test_every_bundled_card_has_a_calibration_of_its_training_seed() -> None:
    assert len(BUNDLED) >= 6
    for path in BUNDLED:
        card = checkpoint.read_card(path)
        cal = Calibration.from_card(card)
        assert cal is not None, path
        data = card["training"]["data"]
        assert cal.data["kind"] == data["kind"] == "synthetic" and cal.data["pair"] == data["pair"], path
        assert cal.data["seed"] == data["seed"] == 0 and cal.data["image_size"] == card["config"]["image_size"], path
        assert cal.n >= 2000 and cal.threshold == pytest.approx(cal.margin * cal.percentiles["p99.9"], rel=1e-5), path


def _test_faces(model: Disentangler, n: int) -> torch.Tensor:
    """The errors of n faces of the test seed: a third each of domain a, domain b and neither attribute."""
    data = {"pair": model.card["training"]["data"]["pair"], "seed": TEST_SEED}
    return torch.cat([reconstruction_error(model, x) for x in synthetic_images(data, n, model.config.image_size)[1]])


def photographs(size: int) -> dict[str, torch.Tensor]:
    """scikit-image's astronaut and matplotlib's grace_hopper.jpg, whole (the central square, as the service's
    default fit takes it) and cropped to the face, as (3, size, size) in [-1, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    matplotlib = pytest.importorskip("matplotlib")
    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")) as f:
        photos = {"astronaut": Image.fromarray(skimage_data.astronaut()), "grace_hopper": load_rgb(f).copy()}
    out = {}
    for name, img in photos.items():
        out[f"{name} (whole)"] = to_tensor(fit(img, size))
        out[f"{name} (face)"] = to_tensor(fit(img.crop(FACE_CROPS[name]), size))
    return out


@pytest.fixture(scope="module", params=[p.name for p in BUNDLED])
def bundled(request: pytest.FixtureRequest) -> tuple[Disentangler, Calibration]:
    model = checkpoint.load(ROOT / "weights" / request.param)
    return model, Calibration.from_card(model.card)


@pytest.mark.slow
def test_rendered_test_faces_pass_every_bundled_model(bundled: tuple[Disentangler, Calibration]) -> None:
    """Every one of the faces: the threshold sits at twice the p99.9 of the training faces, and the test seed's
    faces come from the same distribution, so a single face flagged would mean a broken calibration."""
    model, cal = bundled
    errors = _test_faces(model, TEST_FACES)
    assert not cal.out_of_domain(errors).any(), (model.card["name"], cal.score(errors).max())


def test_real_photographs_are_out_of_domain_for_every_bundled_model(bundled: tuple[Disentangler, Calibration]) -> None:
    model, cal = bundled
    photos = photographs(model.config.image_size)
    errors = reconstruction_error(model, torch.stack(list(photos.values())))
    assert cal.out_of_domain(errors).all(), dict(zip(photos, cal.score(errors).tolist()))


def _untrained_faces(model: Disentangler, n: int) -> dict[str, torch.Tensor]:
    """The errors of n test-seed faces of each kind the training never showed: both attributes of the pair, and
    the benchmark's third attribute alone."""
    from training.synthetic import ATTRIBUTES, PAIRS, render, sample_faces

    x, y = PAIRS[model.card["training"]["data"]["pair"]]
    third = next(a for a in ATTRIBUTES if a not in (x, y))
    kinds = {f"{x} and {y}": {x: True, y: True, third: False}, f"{third} alone": {x: False, y: False, third: True}}
    return {kind: reconstruction_error(model, render(sample_faces(range(n), TEST_SEED, present), model.config.image_size))
            for kind, present in kinds.items()}


def report(faces: int = 1500, untrained: int = 300) -> str:
    """The markdown tables of docs/evaluation.md's "Out-of-domain inputs": each bundled card's calibration, the
    highest score among `faces` rendered test faces and the photographs' scores; then the share of `untrained`
    test faces of the kinds training never showed that are flagged."""
    rows, others = [], []
    for path in BUNDLED:
        model = checkpoint.load(path)
        cal = Calibration.from_card(model.card)
        p = cal.percentiles
        test = cal.score(_test_faces(model, faces)).max().item()
        photos = photographs(model.config.image_size)
        scores = cal.score(reconstruction_error(model, torch.stack(list(photos.values())))).tolist()
        if not rows:
            rows += ["| model | p50 | p90 | p99 | p99.9 | max | threshold (score) | test faces: highest score | "
                     + " | ".join(photos) + " |", "|---" * (8 + len(photos)) + "|"]
        rows.append(f"| {path.name} | " + " | ".join(f"{p[k]:.4f}" for k in p)
                    + f" | {cal.threshold:.4f} ({cal.threshold / p['p99']:.2f}) | {test:.2f} | "
                    + " | ".join(f"{s:.1f}" for s in scores) + " |")
        cells = [f"{cal.out_of_domain(e).float().mean().item():.1%} (highest score {cal.score(e).max().item():.2f})"
                 for e in _untrained_faces(model, untrained).values()]
        others.append(f"| {path.name} | " + " | ".join(cells) + " |")
    head = ["", "| model | flagged: both attributes of the pair | flagged: the third attribute alone |", "|---|---|---|"]
    return "\n".join(rows + head + others) + "\n"


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    print(report(), end="")
