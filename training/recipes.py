"""Recipes: what a training run trains, one TOML file each (training/recipes/NAME.toml), and the runner of its stages.

A recipe names its data, the model preset (and size overrides) and an ordered list of stages; a stage gives its
steps, learning rate, batch size, variant, common-code noise and the weights of its loss terms (`training/terms.py`).
A key a stage leaves out carries over from the stage before (the first stage: the defaults of `Stage`); a stage's
`weights` table updates the previous stage's (a weight of 0 drops a term). `start = "OTHER"` puts the stages of
recipe OTHER first, so a mask recipe can begin from its pair's plain recipe.

Every stage trains into OUT/stages/NN-NAME/ and starts from the previous stage's weights with fresh optimisers and
a fresh latent discriminator; the last stage's weights are written to OUT/model in the recipe's storage dtype, its
card recording the recipe, its sha256, every stage, the overrides and the out-of-domain calibration
(`training/calibration.py`). Re-running the same command continues where
the run stopped: inside a stage from its last checkpoint, at a boundary with the next stage.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.config import PRESETS, VARIANTS, ModelConfig, preset

from . import terms

log = logging.getLogger("did.train")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
PLAN_FILE = "plan.json"


PRECISIONS: tuple[str, ...] = ("auto", "float32", "bf16")  # training.loop.resolve_precision says what each computes in


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, as opposed to what it trains (the recipe). Only `precision` changes the numbers a
    step computes (within bf16 rounding); the card records it beside the device."""

    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, float32 on the CPU), float32 or bf16
    log_every: int = 50
    sample_every: int = 1000  # steps between sample grids (0: only at the end of a stage)
    checkpoint_every: int = 500  # steps between resumable checkpoints (0: only at the end of a stage)
    num_workers: int = 2  # image-decoding workers for file data
    progress: bool = True
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0: no limit


SOURCES: tuple[str, ...] = ("synthetic", "celeba", "folders", "digits")


@dataclass(frozen=True)
class Data:
    """The `[data]` table of a recipe (and the `did train` data flags)."""

    source: str = field(default="synthetic",
                        metadata={"help": "synthetic (the face benchmark), celeba, folders or digits"})
    pair: str = field(default="smile_glasses",
                      metadata={"help": "domain pair of synthetic/celeba: smile_glasses, beard_smile, beard_glasses; "
                                        "of digits: mnist_syndigits, mnist_svhn"})
    image_size: int = field(default=128, metadata={"help": "power of two from 32 to 256 (digits: 32; synthetic: 64 "
                                                           "and up)"})
    root: str = field(default="", metadata={"help": "CelebA root (img_align_celeba/, list_attr_celeba.txt); digits: "
                                                    "a folder of your MNIST idx files and/or SVHN's .mat files"})
    split: str = field(default="train", metadata={"help": "CelebA partition: train, val, test or all"})
    a: str = field(default="", metadata={"help": "folder of domain-a images (folders)"})
    b: str = field(default="", metadata={"help": "folder of domain-b images (folders)"})
    # jitter 1: each digit turned within +-10 degrees, scaled within +-10%, sheared within +-0.15, shifted about
    # +-1.6 px (training.digits.JITTER_BOUNDS); SynDigits vary by their renderer and are never warped
    jitter: float = field(default=0.0, metadata={"help": "digits: how far to warp MNIST / SVHN digits"})

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data source must be {', '.join(SOURCES[:-1])} or {SOURCES[-1]}, not {self.source!r}")
        if not self.jitter >= 0 or (self.jitter and self.source != "digits"):
            raise ValueError(f"jitter warps digits: a number >= 0 with --data digits, not {self.jitter!r} with "
                             f"--data {self.source}")


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: `steps` steps of `batch_size` images per domain (per process) at Adam `lr`."""

    name: str
    steps: int
    lr: float = 2e-4
    batch_size: int = 32
    variant: str = "plain"
    common_noise: float = 0.0  # decodes see E_c(x) + noise of this std relative to the code's RMS (ours)
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"stage {self.name}: variant must be one of {VARIANTS}, not {self.variant!r}")
        for key in ("steps", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"stage {self.name}: {key} must be a whole number >= 1, not {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"stage {self.name}: lr must be > 0, not {self.lr!r}")
        terms.check_weights(self.weights, self.variant, f"stage {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recipe:
    """A recipe file, resolved: every stage complete (and the stages of its `start` recipe first)."""

    name: str
    description: str
    data: Data
    stages: tuple[Stage, ...]
    width: str = "paper"  # models.config.PRESETS
    base_width: int | None = None  # size overrides of the preset
    sep_channels: int | None = None
    code_channels: int | None = None
    common_map: int | None = None
    separate_map: int | None = None
    common_input: str | None = None  # models.config.COMMON_INPUTS
    seed: int = 0
    betas: tuple[float, float] = (0.5, 0.999)
    clip: float = 5.0  # gradient-norm clip of both nets
    save_dtype: str = "float32"  # dtype of the final checkpoint's tensors
    start: str = ""  # the recipe whose stages come first
    files: tuple[tuple[str, str], ...] = ()  # (path relative to the repository, sha256) of this file and its start's

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def variant(self) -> str:
        return self.stages[-1].variant

    def model_overrides(self) -> dict[str, int | str]:
        """The model config fields the recipe sets over its width preset (its fields named as ModelConfig's)."""
        return {k: getattr(self, k) for k in MODEL_KEYS if getattr(self, k) is not None}

    def model_config(self, stage: Stage, domains: tuple[str, str]) -> ModelConfig:
        return preset(self.width, image_size=self.data.image_size, domain_a=domains[0], domain_b=domains[1],
                      variant=stage.variant, **self.model_overrides())

    def plan(self) -> dict[str, Any]:
        """Everything that decides the weights, as JSON: a run directory holds one plan, and continues only it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("stages", "data", "files")}
        return {**fields, "betas": list(self.betas), "data": dataclasses.asdict(self.data),
                "stages": [s.to_dict() for s in self.stages], "files": [list(f) for f in self.files]}


# The settings of a recipe file, which `--set KEY=VALUE` also takes: the fields of Stage (set in every stage), of
# Recipe and of Data, but for names, weights (`--weight`), structure and provenance.
STAGE_KEYS = tuple(f.name for f in dataclasses.fields(Stage) if f.name not in ("name", "weights"))
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe)
                    if f.name not in ("name", "description", "data", "stages", "start", "files"))
DATA_KEYS = tuple(f.name for f in dataclasses.fields(Data))
# The Recipe fields that override a ModelConfig field of the same name (None: the width preset's value).
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name in {m.name for m in dataclasses.fields(ModelConfig)})


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _file_of(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} not found")
        return path
    path = RECIPES_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}; the recipes are {', '.join(available())} (or a path to a .toml file)")
    return path


def _display(path: Path) -> str:
    """The recipe file's path relative to the repository for the bundled ones, else as given."""
    try:
        return str(path.resolve().relative_to(RECIPES_DIR.parent.parent))
    except ValueError:
        return str(path)


def load(name: str, _seen: tuple[str, ...] = ()) -> Recipe:
    """The recipe NAME (training/recipes/NAME.toml) or a path to a .toml file, resolved."""
    path = _file_of(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    where = _display(path)
    known = {"description", "data", "stages", "start", *RECIPE_KEYS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a recipe has {', '.join(sorted(known))}")
    try:
        data = Data(**raw.get("data", {}))
    except TypeError as e:
        raise ValueError(f"{where}: [data]: {e}") from None
    stages: list[Stage] = []
    files: list[tuple[str, str]] = [(where, checkpoint.sha256(path))]
    start = raw.get("start", "")
    if start:
        if start in _seen or start == path.stem:
            raise ValueError(f"{where}: start = {start!r} makes a cycle")
        first = load(start, (*_seen, path.stem))
        stages += [dataclasses.replace(s, name=f"{first.name}.{s.name}") for s in first.stages]
        files += list(first.files)
    previous: dict[str, Any] = {}
    for i, table in enumerate(raw.get("stages", [])):
        if not isinstance(table, dict) or "name" not in table:
            raise ValueError(f"{where}: stage {i + 1} has no name")
        extra = sorted(set(table) - {"name", "weights", *STAGE_KEYS})
        if extra:
            raise ValueError(f"{where}: stage {table['name']}: unknown key(s) {', '.join(extra)}; a stage has "
                             f"name, weights, {', '.join(STAGE_KEYS)}")
        settings = {**previous, **{k: v for k, v in table.items() if k != "weights"}}
        weights = {**previous.get("weights", {}), **table.get("weights", {})}
        settings["weights"] = {k: float(v) for k, v in weights.items() if v}
        try:
            stages.append(Stage(**settings))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        previous = {**settings, "weights": weights}
        previous.pop("name")
    if not stages:
        raise ValueError(f"{where}: a recipe needs at least one [[stages]] table")
    settings = {k: raw[k] for k in RECIPE_KEYS if k in raw}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    recipe = Recipe(name=path.stem, description=raw.get("description", ""), data=data, stages=tuple(stages),
                    start=start, files=tuple(files), **settings)
    return _checked(recipe, where)


def _checked(recipe: Recipe, where: str) -> Recipe:
    if recipe.width not in PRESETS:
        raise ValueError(f"{where}: width must be one of {sorted(PRESETS)}, not {recipe.width!r}")
    if recipe.save_dtype not in checkpoint.DTYPES:
        raise ValueError(f"{where}: save_dtype must be one of {sorted(checkpoint.DTYPES)}, not {recipe.save_dtype!r}")
    if len(recipe.betas) != 2:
        raise ValueError(f"{where}: betas must be two numbers")
    ModelConfig.from_dict({**PRESETS[recipe.width], **recipe.model_overrides(), "image_size": recipe.data.image_size})
    return recipe


def _coerce(key: str, value: str, like: Any) -> Any:
    """A `--set` value as the type of the field it sets."""
    try:
        if isinstance(like, bool):
            raise ValueError
        if isinstance(like, tuple):
            return tuple(float(v) for v in value.split(","))
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except ValueError:
        raise ValueError(f"--set {key}={value}: not a valid value for {key}") from None
    return value


def override(recipe: Recipe, *, weights: dict[str, float] | None = None, settings: dict[str, str] | None = None,
             data: dict[str, Any] | None = None, stage_steps: int | None = None) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with the command line's overrides applied, and the record of them for the card.

    `weights` set a term's weight in every stage whose variant the term applies to; `settings` set recipe, stage
    (every stage) or data keys; `stage_steps` runs every stage for that many steps."""
    weights, settings, data = dict(weights or {}), dict(settings or {}), {k: v for k, v in (data or {}).items() if v is not None}
    record: dict[str, Any] = {}
    recipe_fields: dict[str, Any] = {}
    stage_fields: dict[str, Any] = {}
    for key, value in settings.items():
        if key in STAGE_KEYS:
            stage_fields[key] = _coerce(key, value, getattr(recipe.stages[0], key))
        elif key in RECIPE_KEYS:
            like = getattr(recipe, key)  # a model field the recipe leaves unset (None) is of its ModelConfig type
            recipe_fields[key] = _coerce(key, value, getattr(ModelConfig, key) if like is None else like)
        elif key in DATA_KEYS:
            data[key] = _coerce(key, value, getattr(recipe.data, key))
        else:
            raise ValueError(f"--set {key}: unknown key; the keys are {', '.join(STAGE_KEYS + RECIPE_KEYS + DATA_KEYS)} "
                             f"(loss weights: --weight TERM=VALUE)")
    if stage_steps is not None:
        if stage_steps < 1:
            raise ValueError("--stage-steps must be at least 1")
        stage_fields["steps"] = stage_steps
        record["stage_steps"] = stage_steps
    for name, value in weights.items():
        if name not in terms.TERMS:
            raise ValueError(f"--weight {name}: unknown loss term; the terms are {', '.join(terms.TERMS)}")
        if not any(s.variant in terms.TERMS[name].variants for s in recipe.stages):
            raise ValueError(f"--weight {name}: the term applies to the {' and '.join(terms.TERMS[name].variants)} "
                             f"variant, and no stage of {recipe.name} trains it")
    stages = []
    for s in recipe.stages:
        given = {k: v for k, v in weights.items() if s.variant in terms.TERMS[k].variants}
        merged = {k: v for k, v in {**s.weights, **given}.items() if v}
        stages.append(dataclasses.replace(s, **stage_fields, weights=merged))
    new_data = dataclasses.replace(recipe.data, **data)
    result = _checked(dataclasses.replace(recipe, **recipe_fields, data=new_data, stages=tuple(stages)), recipe.name)
    if weights:
        record["weights"] = weights
    if settings:
        record["set"] = settings
    changed = {k: v for k, v in data.items() if getattr(recipe.data, k) != v}
    if changed:
        record["data"] = changed
    return result, record


def source_class(kind: str) -> type:
    """The data source class of a recipe's `[data] source` (also the `kind` its `describe()` writes in cards)."""
    if kind == "synthetic":
        from .synthetic import SyntheticPairs

        return SyntheticPairs
    if kind == "celeba":
        from .data import CelebAPairs

        return CelebAPairs
    if kind == "digits":
        from .digits import DigitPairs

        return DigitPairs
    if kind == "folders":
        from .data import ImageFolderPairs

        return ImageFolderPairs
    raise ValueError(f"unknown training data kind {kind!r}; expected one of {', '.join(SOURCES)}")


def build_source(data: Data):
    """The data source a recipe's [data] names."""
    cls = source_class(data.source)
    if data.source == "synthetic":
        return cls(data.pair, image_size=data.image_size)
    if data.source == "celeba":
        if not data.root:
            raise ValueError("--data celeba needs --root (the folder holding img_align_celeba/ and list_attr_celeba.txt)")
        return cls(data.root, data.pair, image_size=data.image_size, split=data.split)
    if data.source == "digits":
        return cls(data.pair, image_size=data.image_size, root=data.root or None, jitter=data.jitter)
    if not (data.a and data.b):
        raise ValueError("--data folders needs --a DIR_A and --b DIR_B")
    return cls(data.a, data.b, image_size=data.image_size)


def stage_dirs(recipe: Recipe, out: Path) -> list[Path]:
    return [out / "stages" / f"{i + 1:02d}-{s.name}" for i, s in enumerate(recipe.stages)]


def _check_plan(recipe: Recipe, overrides: dict[str, Any], out: Path) -> None:
    """Write the run's plan into OUT, or refuse to continue a run of another plan there."""
    plan = json.loads(json.dumps({"recipe": recipe.plan(), "overrides": overrides}))  # as it reads back from disk
    path = out / PLAN_FILE
    if path.exists():
        held = json.loads(path.read_text())
        if held != plan:
            changed = sorted(k for k in set(held["recipe"]) | set(plan["recipe"])
                             if held["recipe"].get(k) != plan["recipe"].get(k))
            if held.get("overrides") != plan["overrides"]:
                changed.append("overrides")
            raise ValueError(f"{out} holds a run of recipe {held['recipe']['name']} with other settings "
                             f"({', '.join(changed)} differ): re-run its own command to continue it, or use a new --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_card(plan, path)


def start_from(recipe: Recipe, path: Path) -> tuple[int, dict[str, Any]]:
    """For `did train --start-from CHECKPOINT`: the number of leading stages (those of the recipe's `start`) that
    the checkpoint stands in for, and the start record of the first stage that runs. The checkpoint's card must name
    the start recipe, so its weights are what those stages produce."""
    if not recipe.start:
        raise ValueError(f"--start-from: recipe {recipe.name} has no start recipe whose stages a checkpoint could replace")
    card = checkpoint.read_card(path)
    named = card.get("training", {}).get("recipe", {}).get("name")
    if named != Path(recipe.start).stem:
        raise ValueError(f"--start-from {path}: its card names recipe {named!r}, not {recipe.name}'s start "
                         f"{recipe.start!r}")
    skipped = [s for s in recipe.stages if s.name.startswith(f"{Path(recipe.start).stem}.")]
    return len(skipped), {"stage": skipped[-1].name, "sha256": card["tensors"]["sha256"]}


def run(recipe: Recipe, out: Path, opts, overrides: dict[str, Any] | None = None,
        start_checkpoint: Path | None = None) -> Path | None:
    """Run (or continue) every stage of `recipe` into `out`; returns the final card's path, or None when the time
    budget (opts.max_minutes) stopped the run first. With `start_checkpoint` (a checkpoint of the recipe's start
    recipe) the start recipe's stages are not run: the first of the recipe's own stages starts from its weights.
    Every rank calls this under torchrun."""
    import torch.distributed as dist

    from .loop import resolve_precision, setup_distributed, train_stage

    overrides = dict(overrides or {})
    skip, start = 0, None
    if start_checkpoint is not None:
        skip, start = start_from(recipe, start_checkpoint)
        overrides["start_from"] = start
    d, device = setup_distributed(opts.device)
    computes_in = resolve_precision(device, opts.precision)  # before the plan is written, as the data below
    source = build_source(recipe.data)  # before the plan is written: bad data leaves no run behind
    if d.main:
        _check_plan(recipe, overrides, out)
    if d.world_size > 1:
        dist.barrier()
    provenance = {
        "recipe": {"name": recipe.name, "files": [{"path": p, "sha256": h} for p, h in recipe.files]},
        "overrides": overrides,
        "data": source.describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": d.world_size,
        "precision": computes_in,
        "seed": recipe.seed, "betas": list(recipe.betas), "clip": recipe.clip, "width": recipe.width,
    }
    deadline = time.monotonic() + opts.max_minutes * 60 if opts.max_minutes > 0 else math.inf
    records: list[dict[str, Any]] = []
    init = start_checkpoint
    offset = sum(s.steps for s in recipe.stages[:skip])  # the data stream goes on where the replaced stages left it
    for stage, sdir in list(zip(recipe.stages, stage_dirs(recipe, out)))[skip:]:
        record = {**stage.to_dict(), "start": start}
        result = train_stage(stage, recipe, source=source, out=sdir, opts=opts, dist_info=d, device=device, init=init,
                             data_offset=offset, deadline=deadline,
                             training={**provenance, "stage": record, "data_offset": offset})
        if not result.finished:
            if d.main:
                log.info("stopped in stage %s at step %d of %d; re-run the same command to continue",
                         stage.name, result.step, stage.steps)
            _finish(d)
            return None
        records.append({**record, "minutes": round(result.seconds / 60, 2)})
        init = result.model
        start = {"stage": stage.name, "sha256": checkpoint.read_card(init)["tensors"]["sha256"]}
        offset += stage.steps
    card = None
    if d.main:
        final = checkpoint.load(init)
        training = {**provenance, "stages": records, "steps": sum(r["steps"] for r in records),
                    "minutes": round(sum(r["minutes"] for r in records), 2)}
        card = checkpoint.save(final, out / "model", training=training, dtype=recipe.save_dtype, framing=source.framing)
        from .calibration import calibrate_checkpoint

        calibrate_checkpoint(card, device=device)  # of the tensors as stored (rounded to the save dtype)
    _finish(d)
    return card if card is not None else checkpoint.paths(out / "model")[0]


def _finish(d) -> None:
    import torch.distributed as dist

    if d.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def default_for(data: Data) -> str:
    """The recipe `did train` runs when none is named: the pair's shipped plain recipe for the synthetic benchmark,
    `mnist_syndigits` for every digit pair (the pair flag overrides its data), `paper` for CelebA, `folders` for two
    image folders."""
    if data.source == "synthetic":
        return data.pair
    if data.source == "digits":
        return "mnist_syndigits"
    return "paper" if data.source == "celeba" else "folders"


def listing(weights_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per recipe for `did recipes`: name, data, variant, stages, total steps and the wall time measured
    by the checkpoint in `weights_dir` that names this recipe file (same sha256), if there is one, with the number
    of stages it timed (fewer than the recipe's when it started from a checkpoint of the start recipe)."""
    measured: dict[str, dict[str, Any]] = {}
    for card_path in sorted((weights_dir or Path("weights")).glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        training = card.get("training", {})
        files = training.get("recipe", {}).get("files", [])
        if files and "minutes" in training:
            measured[files[0]["sha256"]] = {"minutes": training["minutes"], "device": training.get("device"),
                                            "checkpoint": card_path.stem, "stages": len(training.get("stages", []))}
    rows = []
    for name in available():
        recipe = load(name)
        data = recipe.data
        row = {"name": name, "data": f"{data.source}" + (f" {data.pair}" if data.source != "folders" else "")
               + f" {data.image_size} px", "variant": recipe.variant, "stages": len(recipe.stages),
               "steps": recipe.total_steps, "measured": measured.get(recipe.files[0][1])}
        rows.append(row)
    return rows
