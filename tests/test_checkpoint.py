"""Checkpoint round trip, card contents and refusal of tampered or mismatched files."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, Disentangler, load, preset, read_card, save


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Disentangler, Path]:
    torch.manual_seed(0)
    model = Disentangler(preset("tiny", image_size=64, domain_a="smile", domain_b="glasses")).eval()
    card = save(model, tmp_path / "model", training={"steps": 7}, metrics={"psnr": 1.5})
    return model, card


def test_round_trip(saved: tuple[Disentangler, Path]) -> None:
    model, card_path = saved
    for form in (card_path, card_path.with_suffix(".safetensors"), card_path.with_suffix(""), card_path.parent):
        loaded = load(form)
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))
    assert loaded.config == model.config and not loaded.training


@pytest.mark.parametrize("width", ["tiny", "slim"])
def test_round_trip_at_32_px(tmp_path: Path, width: str) -> None:
    """The digits' size: one encoder layer fewer than 64 px, down to the same 2x2 code map."""
    torch.manual_seed(1)
    model = Disentangler(preset(width, image_size=32, domain_a="mnist", domain_b="syndigits")).eval()
    assert model.config.num_layers == 4
    card = save(model, tmp_path / "digits", training={"steps": 3})
    loaded = load(card)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.transfer(x, x.flip(0), target="b"), model.transfer(x, x.flip(0), target="b"),
                                   rtol=0, atol=0)
    assert loaded.config == model.config and read_card(card)["config"]["image_size"] == 32


def test_card_contents(saved: tuple[Disentangler, Path]) -> None:
    _, card_path = saved
    card = read_card(card_path)
    assert card["domains"] == {"a": "smile", "b": "glasses"} and card["variant"] == "plain"
    assert card["training"]["steps"] == 7 and card["metrics"]["psnr"] == 1.5
    assert {"torch", "python", "safetensors", "did"} <= set(card["versions"])
    assert len(card["tensors"]["sha256"]) == 64 and card["tensors"]["parameters"] > 0


def test_fp16_storage_halves_size(tmp_path: Path) -> None:
    model = Disentangler(preset("tiny", image_size=64)).eval()
    full = save(model, tmp_path / "full")
    half = save(model, tmp_path / "half", dtype="float16")
    assert read_card(half)["tensors"]["bytes"] < 0.6 * read_card(full)["tensors"]["bytes"]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert (load(half).reconstruct(x) - model.reconstruct(x)).abs().max() < 0.02


def test_refuses_tampered_tensors(saved: tuple[Disentangler, Path]) -> None:
    _, card_path = saved
    tensors = card_path.with_suffix(".safetensors")
    state = load_file(str(tensors))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(tensors))
    with pytest.raises(CheckpointError, match="sha256"):
        load(card_path)


def test_refuses_shape_mismatch_even_with_matching_hash(saved: tuple[Disentangler, Path], tmp_path: Path) -> None:
    _, card_path = saved
    card = json.loads(card_path.read_text())
    card["config"]["sep_channels"] = 5  # the card now describes other nets than the tensors hold
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="shape"):
        load(card_path)


def test_refuses_missing_and_corrupt_files(saved: tuple[Disentangler, Path], tmp_path: Path) -> None:
    _, card_path = saved
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nothing")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(bad)
    card_path.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="tensor file"):
        load(card_path)


def test_no_pickle_on_load_path() -> None:
    source = (Path(__file__).resolve().parents[1] / "models" / "checkpoint.py").read_text()
    assert "torch.load(" not in source and "import pickle" not in source and "pickle.load" not in source
