"""The first minutes of a newcomer: the committed sample faces in examples/, `did data samples` that writes them,
the default model of the bundled weights, the hint towards the models that have a domain, and the README's
first-screen curl run as written against a real `did serve`."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from PIL import Image

from app.registry import PREFERRED_DEFAULT, Registry
from app.settings import Settings
from models import CheckpointError
from models.images import to_tensor
from training.cli import SAMPLES_SEED
from training.cli import main as did
from training.synthetic import ATTRIBUTES, PAIRS, TEST_SEED, TRAIN_SEED, VALIDATION_SEED

from .test_service_process import clean_env, running_did_serve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BUNDLED_WEIGHTS = ROOT / "weights"


def read_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


# --- examples/ and `did data samples` ---------------------------------------------------------------------------

def test_examples_index_lists_every_bundled_pair():
    assert read_index(EXAMPLES) == {"pairs": list(PAIRS)}
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()) == sorted(PAIRS)


@pytest.mark.parametrize("pair", PAIRS)
def test_committed_samples_match_their_index(pair):
    folder = EXAMPLES / pair
    index = read_index(folder)
    assert (index["pair"], index["size"], index["seed"]) == (pair, 64, SAMPLES_SEED)
    a, b = PAIRS[pair]
    labels = [s["label"] for s in index["samples"]]
    assert labels == [a] * 3 + [b] * 3 + ["neither"] * 3
    for j, s in enumerate(index["samples"]):
        assert s["file"] == f"{s['label']}-{j % 3}.png"
        assert s["attributes"] == {name: name == s["label"] for name in ATTRIBUTES}
        with Image.open(folder / s["file"]) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    assert sorted(p.name for p in folder.iterdir()) == sorted([s["file"] for s in index["samples"]] + ["index.json"])
    assert sum(p.stat().st_size for p in folder.iterdir()) < 64 * 1024


def test_samples_seed_is_neither_training_nor_evaluation():
    assert SAMPLES_SEED not in (TRAIN_SEED, VALIDATION_SEED, TEST_SEED)


def test_did_data_samples_writes_the_committed_files_deterministically(tmp_path):
    """Regenerating a pair's samples gives examples/ byte for byte (the PNGs are lossless renders); twice, the same."""
    for run in ("one", "two"):
        assert did(["data", "samples", "--pair", "beard_smile", "--out", str(tmp_path / run)]) == 0
    committed = EXAMPLES / "beard_smile"
    for name in [s["file"] for s in read_index(committed)["samples"]] + ["index.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        if name.endswith(".png"):  # pixels: the renderer is bit-exact on one device, encoders may differ by version
            with Image.open(tmp_path / "one" / name) as im, Image.open(committed / name) as ref:
                assert torch.equal(to_tensor(im), to_tensor(ref))
        else:
            assert (tmp_path / "one" / name).read_bytes() == (committed / name).read_bytes()


def test_did_data_samples_options(tmp_path, capsys):
    out = tmp_path / "s"
    assert did(["data", "samples", "--pair", "smile_glasses", "--out", str(out), "--n", "2", "--size", "128",
                "--seed", "11"]) == 0
    index = read_index(out)
    assert (index["size"], index["seed"], len(index["samples"])) == (128, 11, 6)
    assert [s["file"] for s in index["samples"]][::2] == ["smile-0.png", "glasses-0.png", "neither-0.png"]
    with Image.open(out / "glasses-1.png") as im:
        assert im.size == (128, 128)
    # a larger N keeps the first faces (face i of kind k is face 3i + k of the seed)
    assert did(["data", "samples", "--pair", "smile_glasses", "--out", str(tmp_path / "more"), "--n", "3",
                "--size", "128", "--seed", "11"]) == 0
    assert (tmp_path / "more" / "neither-1.png").read_bytes() == (out / "neither-1.png").read_bytes()
    assert did(["data", "samples", "--pair", "smile_glasses", "--out", str(out), "--size", "100"]) == 2
    assert "--size" in capsys.readouterr().err


# --- the default model ------------------------------------------------------------------------------------------

def test_preferred_default_when_loaded_and_a_missing_named_default_stops_startup(make_service, mask_weights):
    client = make_service(weights=mask_weights)
    cards = client.get("/models").json()
    assert cards["default"] == PREFERRED_DEFAULT
    assert [m["name"] for m in cards["models"] if m["default"]] == [PREFERRED_DEFAULT]
    assert make_service(weights=mask_weights, default_model="smile_glasses").get("/models").json()["default"] == "smile_glasses"
    with pytest.raises(CheckpointError, match="default model 'nope' is not among the checkpoints"):
        Registry.load(Settings(weights=mask_weights, default_model="nope", device="cpu"))


# --- a real `did serve` on the bundled weights ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of `did serve` on the bundled weights, from the repository root as `make serve` runs it."""
    env = {**clean_env(), "DID_TORCH_THREADS": "1"}
    with running_did_serve(BUNDLED_WEIGHTS, env) as base:
        yield base


@pytest.mark.slow
def test_bundled_weights_default_to_the_best_evaluated_model(server):
    cards = httpx.get(server + "/models", timeout=10).json()
    assert cards["default"] == "smile_glasses_mask" == PREFERRED_DEFAULT
    assert [m["name"] for m in cards["models"] if m["default"]] == ["smile_glasses_mask"]


@pytest.mark.slow
@pytest.mark.parametrize("path,field", [("/transfer", "target"), ("/remove-attribute", "attribute")])
def test_a_domain_of_other_models_names_them(server, path, field):
    image = (EXAMPLES / "smile_glasses" / "neither-0.png").read_bytes()
    files = {"content": ("c.png", image, "image/png"), "guide": ("g.png", image, "image/png")} if path == "/transfer" \
        else {"image": ("x.png", image, "image/png")}
    r = httpx.post(server + path, files=files, data={field: "Beard"}, timeout=30)  # no model: the default
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    detail = r.json()["detail"]
    assert detail.startswith(f"{field}: unknown domain 'Beard' for model 'smile_glasses_mask'")
    assert "'smile'" in detail and "'glasses'" in detail  # the model's own domains
    others = detail.split("beard is a domain of ", 1)[1]
    assert re.findall(r"\w+", others.split("(")[0]) == ["beard_glasses", "beard_glasses_mask", "beard_smile", "beard_smile_mask"]
    r = httpx.post(server + path, files=files, data={field: "hat", "model": "beard_smile"}, timeout=30)
    assert r.status_code == 400 and "is a domain of" not in r.json()["detail"]  # no loaded model has it


def readme_first_curl() -> str:
    """The first fenced bash block of README.md that is a curl command (the first-screen example)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    curls = [b.strip() for b in blocks if b.lstrip().startswith("curl ")]
    assert curls, "README.md has no fenced bash block starting with curl"
    return curls[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_first_screen_curl_edits_a_committed_sample(server, tmp_path):
    command = readme_first_curl()
    assert "\n" not in command and "model=" in command and "localhost:8000" in command
    args = shlex.split(command.replace("localhost:8000", server.removeprefix("http://")))
    out = args[args.index("-o") + 1]
    (tmp_path / "examples").symlink_to(EXAMPLES)  # a checkout's root, where the answer lands
    # as written; -sS -w only report curl's errors and the HTTP status
    r = subprocess.run(args + ["-sS", "-w", "%{http_code}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "200", (r.stdout, r.stderr)
    with Image.open(tmp_path / out) as im:
        assert im.format == "PNG" and im.size == (64, 64)
