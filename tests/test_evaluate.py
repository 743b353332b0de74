"""The evaluation: metric functions against hand-computed values, the judge's training step and checkpoint, and
`did eval` end to end on a tiny model."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models import Disentangler, checkpoint, preset
from training import evaluate
from training import judge as judge_mod
from training import metrics
from training.cli import main as did


# --- metrics ----------------------------------------------------------------------------------------------------


def test_psnr_and_l1_of_known_images():
    x = torch.zeros(2, 3, 8, 8)  # 0.5 grey on the [0, 1] scale
    y = x + 0.1  # 0.05 brighter on the [0, 1] scale: MSE 0.0025, PSNR 10 log10(1 / 0.0025) = 26.0206 dB
    assert metrics.psnr(x, y).tolist() == pytest.approx([26.0206] * 2, abs=1e-4)
    assert metrics.l1(x, y).tolist() == pytest.approx([0.05, 0.05])
    assert metrics.psnr(x, x).tolist() == [100.0, 100.0]


def test_masked_psnr_counts_only_the_masked_pixels():
    x = torch.zeros(1, 3, 4, 4)
    y = x.clone()
    y[..., :2, :] = 1.0  # top half off by 0.5 on the [0, 1] scale
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1  # only the bottom half, which is equal
    assert metrics.psnr(x, y, mask=mask).item() == 100.0
    top = 1 - mask
    assert metrics.psnr(x, y, mask=top).item() == pytest.approx(10 * math.log10(1 / 0.25))
    assert math.isnan(metrics.psnr(x, y, mask=torch.zeros_like(mask)).item())


def test_kid_and_fid_of_identical_sets_are_near_zero_and_grow_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g)
    kid_same, _ = metrics.kid(a, a.clone(), subset_size=200)
    assert abs(metrics.fid(a, a.clone())) < 1e-6
    shifted = a + 1.0  # same covariance, mean moved by 1 in each of 16 dimensions: FID = 16
    assert metrics.fid(a, shifted) == pytest.approx(16.0, rel=1e-6)
    kid_far, _ = metrics.kid(a, shifted, subset_size=200)
    assert kid_far > 1.0
    assert abs(kid_same) < 0.02 * kid_far  # the unbiased estimate scatters around 0 by O(kernel / subset size)


def test_cosine_and_iou():
    assert metrics.cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])).item() == pytest.approx(1.0)
    assert metrics.cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(0.0)
    p = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    t = p.clone()
    p[0, 0, 0, :] = True  # 2 pixels
    t[0, 0, :, 0] = True  # 2 pixels, 1 shared: IoU 1/3
    assert metrics.iou(p, t).item() == pytest.approx(1 / 3)
    assert metrics.iou(torch.zeros_like(p), torch.zeros_like(t)).item() == 1.0


# --- judge ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A judge after a few training steps, saved: enough to exercise the pipeline, not to judge anything."""
    judge = judge_mod.train_judge(steps=3, batch=8, progress=False)
    path = tmp_path_factory.mktemp("judge") / "judge"
    return judge_mod.save(judge, path, training={"steps": 3}, metrics={})


def test_judge_training_step_reduces_the_loss_on_its_batch():
    torch.manual_seed(0)
    judge = judge_mod.Judge()
    x, y = next(judge_mod.synthetic_batches(16, 64))
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(judge(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert judge.features(x).shape == (16, judge.config.feature_size)


def test_judge_labels_match_the_rendered_attributes():
    x, y = judge_mod.synthetic_test_set(8, 64)
    assert x.shape == (8, 3, 64, 64) and y.shape == (8, 3)
    assert y.dtype == torch.bool and 0 < y.sum() < y.numel()


def test_judge_checkpoint_round_trip_and_tamper_check(tiny_judge: Path):
    loaded = judge_mod.load(tiny_judge)
    again = judge_mod.load(tiny_judge)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    assert torch.equal(loaded(x), again(x))
    tensors = tiny_judge.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(models.CheckpointError, match="sha256"):
        judge_mod.load(tiny_judge)


# --- did eval ---------------------------------------------------------------------------------------------------

EVAL_KEYS = ("membership", "removal", "gt_psnr", "gt_l1", "gt_remove", "recon_psnr", "kid", "fid", "extractor",
             "similarity", "intersection", "outside_psnr", "domain_detection", "model", "judge", "data")


def _tiny_model(tmp: Path, variant: str = "plain") -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", image_size=64, domain_a="smile", domain_b="glasses", variant=variant)
    return models.save(Disentangler(cfg), tmp / f"tiny_{variant}")


@pytest.fixture(scope="module")
def judge_for_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    judge = judge_mod.train_judge(steps=2, batch=8, progress=False)
    return judge_mod.save(judge, tmp_path_factory.mktemp("judge_eval") / "judge", training={"steps": 2}, metrics={})


def test_judge_with_altered_tensors_is_refused(tmp_path: Path, judge_for_eval: Path):
    """Readable tensors that are not the card's fail its sha256 pin; tensors that match a changed pin but not the
    card's config fail the shape check. Both name the tensor file."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(judge_for_eval.with_suffix(suffix), tmp_path / f"judge{suffix}")
    card_path, tensors = tmp_path / "judge.json", tmp_path / "judge.safetensors"
    state = load_file(str(tensors))
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, str(tensors))
    with pytest.raises(models.CheckpointError, match="sha256") as refused:
        judge_mod.load(tmp_path)
    assert str(tensors) in str(refused.value)
    state["head.bias"] = state["head.bias"][:2]
    save_file(state, str(tensors))
    card = json.loads(card_path.read_text())
    card["tensors"]["sha256"] = checkpoint.sha256(tensors)
    card_path.write_text(json.dumps(card))
    with pytest.raises(models.CheckpointError, match="head.bias has shape") as refused:
        judge_mod.load(card_path)
    assert str(tensors) in str(refused.value)


def test_bundled_judge_loads_as_stored():
    weights = Path(__file__).resolve().parent.parent / "weights" / "judge"
    judge = judge_mod.load(weights)
    assert judge.card["format"] == judge_mod.FORMAT
    assert judge.card["tensors"]["sha256"] == checkpoint.sha256(weights / "judge.safetensors")
    stored = load_file(str(weights / "judge.safetensors"))
    assert all(torch.equal(v, stored[k]) for k, v in judge.state_dict().items()) and judge.state_dict().keys() == stored.keys()
    with pytest.raises(models.CheckpointError, match="not a did-checkpoint/1 model card"):
        models.load(weights / "judge.json")  # a judge is not an editing model, and the other way round
    with pytest.raises(models.CheckpointError, match="not a did-judge/1 judge card"):
        judge_mod.load(weights.parent / "smile_glasses")


def test_did_eval_writes_every_key(tmp_path: Path, judge_for_eval: Path, capsys: pytest.CaptureFixture):
    card = _tiny_model(tmp_path)
    out = tmp_path / "eval.json"
    figs = tmp_path / "figs"
    assert did(["eval", "--model", str(card), "--judge", str(judge_for_eval), "--n", "16", "--device", "cpu",
                "--json", str(out), "--figures", str(figs)]) == 0
    result = json.loads(out.read_text())
    for key in EVAL_KEYS:
        assert key in result, key
    assert set(result["membership"]) == {"a_to_b", "b_to_a"}
    assert set(result["domain_detection"]) == {"a", "b"}
    for rate in (*result["membership"].values(), *result["removal"].values(), *result["domain_detection"].values()):
        assert 0.0 <= rate <= 1.0
    rates = result["judge_rates"]
    assert set(rates) == {"a_to_b", "b_to_a", "remove_a", "remove_b"}
    for own in ("a", "b"):  # a removal without either attribute has neither failure
        parts = rates[f"remove_{own}"]
        assert result["removal"][own] <= 1 - max(parts["kept_own_attribute"], parts["has_other_attribute"]) + 1e-4  # rates are rounded
    assert result["data"]["n"] == 16 and result["data"]["seed"] == 7919
    assert result["model"]["sha256"] == json.loads(card.read_text())["tensors"]["sha256"]
    assert all(math.isfinite(v) for v in result["gt_psnr"].values())
    assert "mask_iou" not in result
    keys = {"a_to_b", "b_to_a", "remove_a", "remove_b"}
    assert set(result["similarity_perfect"]) == keys and set(result["similarity_to_truth"]) == keys
    assert out.with_suffix(".md").read_text().startswith("| model |")
    assert {p.name for p in figs.iterdir()} >= {"smile_glasses_transfer_to_b.png", "smile_glasses_removal.png",
                                                 "smile_glasses_intersection.png", "smile_glasses_interpolation.png"}
    assert "membership" in capsys.readouterr().out


def test_similarity_of_a_perfect_removal_is_the_ground_truth_scored_against_the_input(tmp_path: Path, judge_for_eval: Path):
    """`similarity_perfect` is measured independently here: render the test contents and their attribute-free
    ground truth, and take the cosine of the judge's features; an edit equal to its truth scores 1 on
    `similarity_to_truth`."""
    from training import evaluate, synthetic

    judge = judge_mod.load(judge_for_eval)
    model = models.load(_tiny_model(tmp_path))
    result = evaluate.evaluate(model, judge, n=8, device="cpu")
    contents = synthetic.sample_faces(torch.arange(0, 8), synthetic.TEST_SEED, {"smile": True, "glasses": False, "beard": False})
    img, truth = synthetic.render(contents, 64), synthetic.render(contents.edit(smile=False), 64)
    with torch.no_grad():
        expected = metrics.cosine(judge.features(img), judge.features(truth)).mean().item()
    assert result["similarity_perfect"]["remove_a"] == pytest.approx(expected, abs=1e-4)

    scorer = evaluate._Scorer(judge, torch.device("cpu"), 8)
    f_img = scorer.features(img)
    truths = evaluate._Edits(truth, truth, truth, truth, img, img)
    perfect = evaluate._against_truth(scorer, truths, {"remove_a": (f_img, scorer.features(truth))})
    assert perfect["similarity_to_truth"]["remove_a"] == pytest.approx(1.0, abs=1e-6)


def test_did_eval_refuses_a_model_of_no_benchmark_pair(tmp_path: Path, judge_for_eval: Path, capsys: pytest.CaptureFixture):
    card = models.save(Disentangler(preset("tiny", image_size=64, domain_a="cats", domain_b="dogs")), tmp_path / "cd")
    assert did(["eval", "--model", str(card), "--judge", str(judge_for_eval), "--n", "4", "--device", "cpu"]) == 2
    assert "not a synthetic benchmark pair" in capsys.readouterr().err


def test_did_eval_on_a_mask_model_adds_mask_iou(tmp_path: Path, judge_for_eval: Path):
    if "mask" not in models.config.VARIANTS:
        pytest.skip("mask variant not available")
    card = _tiny_model(tmp_path, "mask")
    out = tmp_path / "mask.json"
    assert did(["eval", "--model", str(card), "--judge", str(judge_for_eval), "--n", "8", "--device", "cpu",
                "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["mask_iou"]) == {"a", "b"}
    for v in result["mask_iou"].values():
        assert 0.0 <= v["at_0.5"] <= v["best"] <= 1.0
    assert set(result["outside_psnr"]) >= {"a_to_b", "b_to_a"}


def test_did_eval_in_bf16_compares_every_edit_with_float32(tmp_path: Path, judge_for_eval: Path):
    """--dtype bfloat16 evaluates the model computing in bf16 and scores each edit against the float32 model's own
    output on the same faces: high but finite PSNR (bf16's rounding), the dtype named in the tables."""
    card = _tiny_model(tmp_path, "mask" if "mask" in models.config.VARIANTS else "plain")
    out = tmp_path / "bf16.json"
    assert did(["eval", "--model", str(card), "--judge", str(judge_for_eval), "--n", "8", "--device", "cpu",
                "--dtype", "bfloat16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and evaluate.label(result).endswith("(bfloat16)")
    assert set(result["vs_float32_psnr"]) == {"out_ab", "out_ba", "rm_a", "rm_b", "rec_a", "rec_b"}
    assert all(30 < v < 100 for v in result["vs_float32_psnr"].values()), result["vs_float32_psnr"]
    assert "(bfloat16)" in out.with_suffix(".md").read_text()


def test_did_eval_compares_a_mask_model_with_a_plain_one_on_the_same_faces(tmp_path: Path, judge_for_eval: Path,
                                                                           capsys: pytest.CaptureFixture):
    mask, plain = _tiny_model(tmp_path, "mask"), _tiny_model(tmp_path, "plain")
    out = tmp_path / "cmp.json"
    assert did(["eval", "--model", str(mask), "--compare", str(plain), "--judge", str(judge_for_eval), "--n", "8",
                "--device", "cpu", "--json", str(out)]) == 0
    alone = json.loads(out.read_text())
    beside = json.loads((tmp_path / "cmp.vs-tiny_plain.json").read_text())
    assert (alone["model"]["variant"], beside["model"]["variant"]) == ("mask", "plain")
    assert alone["data"] == beside["data"], "compared models must be measured on the same faces"
    for r in (alone, beside):
        assert {"remove", "remove_a", "remove_b"} <= set(r["kid"]) and {"remove_a", "remove_b"} <= set(r["similarity"])
    md = out.with_suffix(".md").read_text()
    removal_rows = [line for line in md.splitlines() if line.startswith("| tiny_")]
    assert len(removal_rows) == 8, md  # 2 directions + 2 removed attributes, for each model
    assert "| tiny_plain | plain | glasses | " in md and "| tiny_mask | mask | smile | " in md
    assert "| removed | classification |" in capsys.readouterr().out


def test_did_eval_refuses_to_compare_models_of_other_domains(tmp_path: Path, judge_for_eval: Path,
                                                             capsys: pytest.CaptureFixture):
    other = models.save(Disentangler(preset("tiny", image_size=64, domain_a="beard", domain_b="glasses")), tmp_path / "bg")
    assert did(["eval", "--model", str(_tiny_model(tmp_path)), "--compare", str(other), "--judge", str(judge_for_eval),
                "--n", "4", "--device", "cpu"]) == 2
    assert "only like models compare" in capsys.readouterr().err


def test_judge_and_eval_on_celeba_format_data(tmp_path: Path):
    from tests.celeba_fixture import make_celeba

    root = make_celeba(tmp_path / "celeba", n=40, corrupt=1)["root"]
    labelled = judge_mod.celeba_labelled(root, "train")
    x, y = labelled[0]
    assert x.shape == (3, 64, 64) and y.shape == (3,)
    card = tmp_path / "judge_celeba"
    assert did(["judge", "train", "--data", "celeba", "--root", str(root), "--steps", "2", "--batch-size", "4",
                "--device", "cpu", "--no-progress", "--out", str(card)]) == 0
    judge_card = json.loads(card.with_suffix(".json").read_text())
    assert "test_accuracy_celeba" in judge_card["metrics"] and "CelebA" in judge_card["training"]["data"]
    model = _tiny_model(tmp_path)
    out = tmp_path / "celeba_eval.json"
    assert did(["eval", "--data", "celeba", "--root", str(root), "--model", str(model), "--judge", str(card),
                "--n", "8", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["source"] == "celeba" and result["data"]["split"] == "test"
    for key in ("membership", "removal", "recon_psnr", "kid", "fid", "similarity"):
        assert result[key], key


def test_mask_probe_reports_mask_means_and_refuses_a_plain_model(tmp_path: Path, judge_for_eval: Path):
    from training import mask_probe

    judge = judge_mod.load(judge_for_eval)
    report, picture = mask_probe.probe(models.load(_tiny_model(tmp_path, "mask")), judge, n=4)
    assert set(report) == {"smile", "glasses"}
    for r in report.values():
        assert 0.0 <= r["mask_inside"] <= 1.0 and 0.0 <= r["mask_outside"] <= 1.0
        assert set(r["judge_on_attribute_free_decode"]) == set(judge.config.attributes)
        assert 0.0 < r["changed_pixels_iou"] < 1.0  # anti-aliased edges: some touched pixels are under half covered
        assert 0.0 <= r["missed_at_0.5"] <= 1.0 and r["extra_at_0.5"] >= 0.0
    assert picture.shape == (2 * 4 * 4, 3, 64, 64) and picture.min() >= -1 and picture.max() <= 1
    with pytest.raises(ValueError, match="no masks"):
        mask_probe.probe(models.load(_tiny_model(tmp_path)), judge, n=2)
    assert mask_probe.main([str(_tiny_model(tmp_path, "mask")), "--judge", str(judge_for_eval), "--n", "2",
                            "--out", str(tmp_path / "probe.png")]) == 0
    assert (tmp_path / "probe.png").stat().st_size > 0


def test_tables_name_a_training_run_by_its_directory():
    from training.evaluate import label

    assert label({"model": {"name": "model", "path": "runs/a/s1"}}) == "s1"
    assert label({"model": {"name": "model", "path": "runs/a/s2/model.json"}}) == "s2"
    assert label({"model": {"name": "smile_glasses", "path": "weights/smile_glasses"}}) == "smile_glasses"


def test_domain_detection_counts_the_faces_whose_larger_separate_code_is_their_own():
    from training.evaluate import _detection

    torch.manual_seed(0)
    model = Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")).eval()
    with torch.no_grad():
        model.enc_a.head.bias.fill_(5.0)  # E_sA answers loudly on every image: everything looks like domain a
    faces = torch.rand(6, 3, 64, 64) * 2 - 1
    assert _detection(model, faces[:3], faces[3:], batch=2, dev=torch.device("cpu")) == {"a": 1.0, "b": 0.0}


def test_export_then_record_keeps_the_notes_and_writes_the_headline_metrics(tmp_path: Path, judge_for_eval: Path):
    run = _tiny_model(tmp_path)
    dest = tmp_path / "weights" / "smile_glasses"
    assert did(["export", str(run), str(dest), "--dtype", "float16", "--notes", "64 px, CPU"]) == 0
    exported = models.load(dest, device="cpu")
    assert exported.card["tensors"]["dtype"] == "float16" and exported.card["notes"] == "64 px, CPU"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(exported.reconstruct(x), models.load(run, device="cpu").reconstruct(x), atol=2e-2)
    assert did(["eval", "--model", str(dest), "--judge", str(judge_for_eval), "--n", "4", "--device", "cpu",
                "--record"]) == 0
    card = json.loads(dest.with_suffix(".json").read_text())
    assert card["notes"] == "64 px, CPU"
    assert {"membership", "removal", "gt_psnr", "domain_detection", "measured_on"} <= set(card["metrics"])
    assert card["metrics"]["measured_on"]["n"] == 4
    assert models.load(dest, device="cpu").card["tensors"]["sha256"] == exported.card["tensors"]["sha256"]


@pytest.mark.parametrize(("kind", "framing"), [("synthetic", "synthetic"), ("folders", "none"), ("digits", "none")])
def test_export_of_a_card_without_framing_takes_its_training_data_framing(tmp_path: Path, kind: str, framing: str):
    """A run card written before cards named a framing: the export names the framing of its training data's source,
    so that the service places uploads as the model saw faces. A card's own framing is kept."""
    run = _tiny_model(tmp_path)
    card_path = run.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.pop("framing", None)
    card["training"]["data"] = {"kind": kind}
    card_path.write_text(json.dumps(card))
    assert did(["export", str(run), str(tmp_path / "out"), "--calibration-n", "0"]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["framing"] == framing
    card["framing"] = "celeba"
    card_path.write_text(json.dumps(card))
    assert did(["export", str(run), str(tmp_path / "kept"), "--calibration-n", "0"]) == 0
    assert json.loads((tmp_path / "kept.json").read_text())["framing"] == "celeba"
