"""The training module end to end: the `did train` command, exact resume, and a 2-process torchrun (gloo) job."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load, read_card
from training.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_did_train_lowers_reconstruction_and_writes_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--data", "synthetic", "--pair", "smile_glasses", "--image-size", "64", "--batch-size", "16",
               "--steps", "40", "--width", "slim", "--log-every", "10", "--sample-every", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    log = _log(out)
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    assert {"step", "recon_a", "recon_b", "zero", "adv", "disc", "images_per_s"} <= set(log[0])
    first, last = log[0]["recon_a"] + log[0]["recon_b"], log[-1]["recon_a"] + log[-1]["recon_b"]
    assert last < 0.8 * first, (first, last)
    model = load(out)
    card = read_card(out / "model.json")
    assert card["domains"] == {"a": "smile", "b": "glasses"}
    assert card["training"]["steps"] == 40 and card["training"]["data"]["kind"] == "synthetic"
    assert model.config.image_size == 64
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000020.png", "step_0000040.png"]
    assert (out / "train_state.pt").exists()


def _tiny(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--image-size", "64", "--batch-size", "4", "--steps", str(steps), "--width", "tiny", "--log-every", "1",
            "--sample-every", "0", "--checkpoint-every", "0", "--out", str(out), "--no-progress", *extra]


def test_size_overrides_reach_the_model(tmp_path: Path) -> None:
    """--base-width, --sep-channels and --code-channels replace the preset's sizes, in the nets and in the card."""
    out = tmp_path / "run"
    assert main(_tiny(out, 1, "--base-width", "4", "--sep-channels", "3", "--code-channels", "24")) == 0
    config = read_card(out / "model.json")["config"]
    assert (config["base_width"], config["sep_channels"], config["code_channels"]) == (4, 3, 24)
    model = load(out / "model")
    assert model.enc_a.body[0][0].out_channels == 4 and model.config.common_channels == 18


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_tiny(straight, 6)) == 0
    assert main(_tiny(split, 3)) == 0
    assert main(_tiny(split, 6, "--resume")) == 0
    a = torch.load(straight / "train_state.pt", weights_only=True)
    b = torch.load(split / "train_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], msg=key)
    assert [r["step"] for r in _log(split)] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(_log(straight), _log(split)):
        assert x["recon_a"] == pytest.approx(y["recon_a"], rel=1e-5)


def test_resume_takes_the_new_learning_rate(tmp_path: Path) -> None:
    """A resumed run given another --lr / --beta1 trains at them (Adam's moments kept), as its card records."""
    out = tmp_path / "run"
    assert main(_tiny(out, 2)) == 0
    assert main(_tiny(out, 3, "--resume", "--lr", "0.00005", "--beta1", "0.7")) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    for key in ("opt_g", "opt_d"):
        assert [g["lr"] for g in state[key]["param_groups"]] == [0.00005] * len(state[key]["param_groups"])
        assert all(g["betas"][0] == 0.7 for g in state[key]["param_groups"])
        assert state[key]["state"]  # the moments came along
    assert read_card(out / "model.json")["training"]["config"]["lr"] == 0.00005


def test_resume_without_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_tiny(tmp_path / "none", 2, "--resume")) == 2
    assert "no train_state.pt" in capsys.readouterr().err


def test_resume_of_another_layout_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "old"
    assert main(_tiny(out, 1)) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    # the layout of runs made before the discriminator lost its spectral norm
    state["disc"] = {k.replace("weight", "parametrizations.weight.original"): v for k, v in state["disc"].items()}
    torch.save(state, out / "train_state.pt")
    assert main(_tiny(out, 2, "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and "--init" in err


def test_disc_steps_updates_the_discriminator_that_often(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k3"
    assert main(_tiny(out, 2, "--disc-steps", "3")) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    d_steps = {int(s["step"]) for s in state["opt_d"]["state"].values()}
    g_steps = {int(s["step"]) for s in state["opt_g"]["state"].values()}
    assert d_steps == {6} and g_steps == {2}
    assert read_card(out / "model.json")["training"]["config"]["disc_steps"] == 3
    assert main(_tiny(tmp_path / "k0", 1, "--disc-steps", "0")) == 2
    assert "disc_steps" in capsys.readouterr().err


def test_structure_weight_adds_logged_terms(tmp_path: Path) -> None:
    out = tmp_path / "ssim"
    assert main(_tiny(out, 2, "--structure-weight", "2")) == 0
    log = _log(out)
    assert all(0 < r["structure_a"] <= 2 and 0 < r["structure_b"] <= 2 for r in log)
    row = log[-1]
    # the logged total is the weighted sum, structure included
    expected = row["recon_a"] + row["recon_b"] + row["zero"] + 0.001 * row["adv"] + 2 * (row["structure_a"] + row["structure_b"])
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert read_card(out / "model.json")["training"]["config"]["structure_weight"] == 2
    assert "structure_a" not in _log_of_plain(tmp_path)


def _log_of_plain(tmp_path: Path) -> dict:
    out = tmp_path / "plain"
    assert main(_tiny(out, 1)) == 0
    return _log(out)[-1]


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["train", "--data", "celeba", "--out", str(tmp_path)]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--image-size", "100", "--out", str(tmp_path)]) == 2
    assert "power of two" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "--data", "synthetic", "--image-size", "64", "--batch-size", "4", "--steps", "6",
           "--width", "tiny", "--device", "cpu", "--log-every", "3", "--sample-every", "0", "--out", str(out), "--no-progress"]
    # A session of its own, so a hung job is killed with all its workers, not just the launcher.
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    card = read_card(out / "model.json")
    assert card["training"]["world_size"] == 2 and card["training"]["steps"] == 6
    assert [r["step"] for r in _log(out)] == [3, 6]
    assert sorted(p.name for p in out.glob("*.json")) == ["model.json"]
    load(out)


def test_removal_weight_charges_the_attribute_free_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "removal"
    assert main(_tiny(out, 2, "--removal-weight", "3")) == 0
    log = _log(out)
    assert all(r["removal"] > 0 for r in log)
    row = log[-1]
    expected = row["recon_a"] + row["recon_b"] + row["zero"] + 0.001 * row["adv"] + 3 * row["removal"]
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert read_card(out / "model.json")["training"]["config"]["removal_weight"] == 3
    assert "removal" not in _log_of_plain(tmp_path)
    assert main(_tiny(tmp_path / "neg", 1, "--removal-weight", "-1")) == 2
    assert "removal_weight" in capsys.readouterr().err
    # the mask variant charges the attribute-free bases its pass already decodes
    assert main(_tiny(tmp_path / "mask", 1, "--variant", "mask", "--removal-weight", "1")) == 0
    assert _log(tmp_path / "mask")[-1]["removal"] > 0


def _check_mask_only_weight(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, key: str) -> None:
    """A mask-variant-only loss weight: a tiny mask run logs its term and records the weight in the card, and a
    plain run refuses the flag (exit 2, naming the variant)."""
    out = tmp_path / "run"
    assert main(_tiny(out, 2, "--variant", "mask", flag, "3")) == 0
    assert all(r[key] > 0 for r in _log(out))
    assert read_card(out / "model.json")["training"]["config"][f"{key}_weight"] == 3
    assert main(_tiny(tmp_path / "plain", 1, flag, "1")) == 2
    assert "variant 'mask'" in capsys.readouterr().err


def test_masked_removal_weight_charges_the_removal_through_the_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The mask variant's removal term on m * G(c, 0, 0) + (1 - m) * x: the composite is the soft removal the model
    serves, and its gradient reaches the mask channel of the decoder."""
    from models.config import preset
    from training.loop import TrainConfig, Trainer

    _check_mask_only_weight(tmp_path, capsys, "--masked-removal-weight", "masked_removal")

    cfg = TrainConfig(width="tiny", variant="mask", masked_removal_weight=1.0, batch_size=2)
    trainer = Trainer(cfg, preset("tiny", image_size=64, variant="mask"), torch.device("cpu"))
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    trainer.model.eval()  # in train mode every forward steps spectral norm's power iteration
    mp = trainer.gen(a, b)
    removed = trainer._masked_removals(mp.rgb, mp.mask, a, b)
    soft = trainer.model.remove(torch.cat([a, b]), torch.tensor([0, 1]).repeat_interleave(2), soft=True)
    torch.testing.assert_close(removed, soft, atol=1e-5, rtol=1e-4)
    trainer._removal_term(removed).backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0  # the mask channel's logits


def _translations(**weights: float):
    """A tiny mask trainer with `weights` on (eval mode: no power-iteration steps), a pass on random a and b, and
    the two translations computed the long way: (trainer, pass, codes of a, codes of b, t_a = a with b's attribute,
    t_b = b with a's)."""
    from models.config import preset
    from training.loop import TrainConfig, Trainer

    cfg = TrainConfig(width="tiny", variant="mask", batch_size=2, **weights)
    trainer = Trainer(cfg, preset("tiny", image_size=64, variant="mask"), torch.device("cpu"))
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    trainer.model.eval()
    mp = trainer.gen(a, b)
    with torch.no_grad():
        ca, cb = trainer.model.encode(a), trainer.model.encode(b)
        t_a = trainer.model.decode(ca.common, torch.zeros_like(ca.sep_a), cb.sep_b)
        t_b = trainer.model.decode(cb.common, ca.sep_a, torch.zeros_like(cb.sep_b))
    return trainer, mp, ca, cb, t_a, t_b


def test_translated_own_weight_charges_the_contents_own_attribute_on_its_translation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The term reads each translation with the separate encoder of its content's own domain (a's content with b's
    attribute by E_sA, b's by E_sB), on the translation as composited in the pass; the reading encoders are detached
    (the gradient reaches the decoder, the common code and the guide's separate code that drew the translation)."""
    _check_mask_only_weight(tmp_path, capsys, "--translated-own-weight", "translated_own")

    trainer, mp, _, _, t_a, t_b = _translations(translated_own_weight=1.0)
    term = trainer._translated_own_term(mp.translated)
    with torch.no_grad():
        expected = trainer.model.enc_a(t_a).abs().mean() + trainer.model.enc_b(t_b).abs().mean()
    torch.testing.assert_close(term.detach(), expected, atol=1e-5, rtol=1e-4)
    # the reading encoders are detached: on detached translations the term has no gradient to give
    assert not trainer._translated_own_term(mp.translated.detach()).requires_grad
    term.backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0  # through the translations' masks


def test_translated_guide_weight_reads_the_guides_attribute_back_from_its_translation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The term reads each translation with the separate encoder of its guide's domain (a's content with b's
    attribute by E_sB, against b's own code; b's by E_sA, against a's) through detached encoders and detached
    targets: its gradient reaches the translation (and its mask), never the readers."""
    _check_mask_only_weight(tmp_path, capsys, "--translated-guide-weight", "translated_guide")

    trainer, mp, ca, cb, t_a, t_b = _translations(translated_guide_weight=1.0)
    term = trainer._translated_guide_term(mp.translated, mp.codes_a.sep_a, mp.codes_b.sep_b)
    with torch.no_grad():
        expected = (trainer.model.enc_b(t_a) - cb.sep_b).abs().mean() + (trainer.model.enc_a(t_b) - ca.sep_a).abs().mean()
    torch.testing.assert_close(term.detach(), expected, atol=1e-5, rtol=1e-4)
    # neither the readers nor the targets pass a gradient: on detached translations the term has none to give (the
    # guide's encoder is still trained as the producer of the code that drew the translation)
    detached = trainer._translated_guide_term(mp.translated.detach(), mp.codes_a.sep_a, mp.codes_b.sep_b)
    assert not detached.requires_grad
    term.backward()
    assert trainer.model.decoder.to_rgb.weight.grad[:, 3].abs().sum() > 0  # through the translations' masks


def test_removal_term_reads_the_separate_encoders_without_training_them() -> None:
    """The term's gradient reaches the decoder and the common encoder, never the separate encoders that judge."""
    from models.config import preset
    from training.loop import TrainConfig, Trainer

    cfg = TrainConfig(width="tiny", removal_weight=1.0, batch_size=2)
    trainer = Trainer(cfg, preset("tiny", image_size=64), torch.device("cpu"))
    out = trainer.gen(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.removed is not None and out.removed.shape == (4, 3, 64, 64)
    expected = trainer.model.decode(torch.cat([out.codes_a.common, out.codes_b.common]))
    torch.testing.assert_close(out.removed, expected)
    trainer._removal_term(out.removed).backward()
    separate = [p for enc in (trainer.model.enc_a, trainer.model.enc_b) for p in enc.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in separate)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.enc_common.parameters())


def test_common_noise_is_relative_to_each_codes_size_and_reaches_only_the_decodes(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from models.config import preset
    from training.loop import TrainConfig, Trainer, noisy_common

    common = torch.randn(2, 64, 2, 2) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    assert noisy_common(common, 0.0) is common
    torch.manual_seed(0)
    noise = noisy_common(common, 0.5) - common
    rms = common.pow(2).mean(dim=(1, 2, 3)).sqrt()
    # the noise of each image follows that image's code size: a code ten times larger gets ten times the noise
    ratio = noise.flatten(1).std(1) / (0.5 * rms)
    assert torch.allclose(ratio, torch.ones(2), atol=0.25), ratio

    # In a training pass the reconstructions are decoded from the noisy code, while the codes handed to the
    # adversary (codes_a/codes_b) are the clean ones.
    cfg = TrainConfig(width="tiny", common_noise=1.0, batch_size=2)
    trainer = Trainer(cfg, preset("tiny", image_size=64), torch.device("cpu"))
    trainer.model.eval()  # no power iteration between the two encodes, so they can be compared exactly
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    out = trainer.gen(a, b)
    clean = trainer.model.encode(a)
    torch.testing.assert_close(out.codes_a.common, clean.common)
    assert not torch.allclose(out.recon_a, trainer.model.decode(clean.common, clean.sep_a))

    run = tmp_path / "noise"
    assert main(_tiny(run, 2, "--common-noise", "0.2")) == 0
    assert read_card(run / "model.json")["training"]["config"]["common_noise"] == 0.2
    assert main(_tiny(tmp_path / "mask", 1, "--variant", "mask", "--common-noise", "0.2")) == 0
    assert main(_tiny(tmp_path / "neg", 1, "--common-noise", "-1")) == 2
    assert "common_noise" in capsys.readouterr().err


def test_neither_weight_trains_the_attribute_free_decode_on_faces_without_either(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "neither"
    assert main(_tiny(out, 2, "--neither-weight", "2", "--structure-weight", "1")) == 0
    log = _log(out)
    assert all(r["neither"] > 0 and r["neither_zero"] > 0 for r in log)
    row = log[-1]
    expected = (row["recon_a"] + row["recon_b"] + row["zero"] + 0.001 * row["adv"] + row["structure_a"]
                + row["structure_b"] + 2 * row["neither"] + row["neither_zero"])
    assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert read_card(out / "model.json")["training"]["config"]["neither_weight"] == 2
    assert "neither" not in _log_of_plain(tmp_path)
    assert main(_tiny(tmp_path / "mask", 1, "--variant", "mask", "--neither-weight", "1")) == 0
    assert _log(tmp_path / "mask")[-1]["neither"] > 0
    assert main(_tiny(tmp_path / "neg", 1, "--neither-weight", "-1")) == 2
    assert "neither_weight" in capsys.readouterr().err


def test_neither_term_decodes_with_both_separate_codes_zero() -> None:
    from models.config import preset
    from training.loop import TrainConfig, Trainer

    cfg = TrainConfig(width="tiny", neither_weight=1.0, batch_size=2)
    trainer = Trainer(cfg, preset("tiny", image_size=64), torch.device("cpu"))
    trainer.model.eval()  # no power iteration between the encodes compared below
    a, b, n = (torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(3))
    out = trainer.gen(a, b, n)
    codes = trainer.model.encode(n)
    torch.testing.assert_close(out.neither.codes.common, codes.common)
    torch.testing.assert_close(out.neither.decoded, trainer.model.decode(codes.common))
    with pytest.raises(ValueError, match="neither"):
        trainer.step(a, b)


def test_neither_weight_on_data_without_such_faces_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (80, 80), (40, 90, 200)).save(tmp_path / name / "x.png")
    args = ["train", "--data", "folders", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--image-size", "64",
            "--width", "tiny", "--steps", "1", "--neither-weight", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 2
    assert "synthetic" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.json").exists()


def test_neither_adversary_tells_three_groups_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "three"
    assert main(_tiny(out, 2, "--neither-weight", "1", "--neither-adversary")) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["disc"]["net.3.weight"].shape[0] == 3  # one logit per group: A, B, neither
    assert read_card(out / "model.json")["training"]["config"]["neither_adversary"] is True
    assert all(math.isfinite(r["disc"]) and math.isfinite(r["adv"]) for r in _log(out))
    assert main(_tiny(tmp_path / "alone", 1, "--neither-adversary")) == 2
    assert "neither_weight" in capsys.readouterr().err
