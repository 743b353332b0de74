"""Wall time of every training recipe on this machine, estimated from a short run of each of its stages.

    python -m bench.recipes [--recipes NAME ...] [--steps 60] [--device auto] [--precision auto] [--write]

A full recipe takes hours on a CPU; this trains every stage of each recipe for `--steps` steps through the recipe
runner itself (`training.recipes.run`, as `did train --recipe NAME --stage-steps N` does: real data, the stage's
terms, the trainer's precision and layout), reads the stage's logged steps/s (the training loop's own rate, data
included, checkpoint and sample writing excluded), drops the first window (warm-up) and takes the median of the
rest. A recipe's estimate is the sum over its stages of steps / rate. A mask recipe's own stages start from the
shipped checkpoint of its start recipe (`--start-from weights/START`), and its estimate from scratch adds the start
recipe's. Recipes whose data is not on this machine (CelebA, folders, MNIST) are listed as such. Where a checkpoint
in weights/ was trained by the recipe runner (its card's `training.minutes`), that time is given beside the
estimate, with the stages it covers."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from training import recipes
from training.loop import LOG_FILE
from training.markdown import table

from .report import write_section

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def stage_rates(out: Path, recipe: recipes.Recipe, skip: int) -> list[float]:
    """Median steps/s of each stage that ran (the first logged window dropped), read from its log.jsonl."""
    rates = []
    for sdir in recipes.stage_dirs(recipe, out)[skip:]:
        windows = [json.loads(line)["steps_per_s"] for line in (sdir / LOG_FILE).read_text().splitlines()]
        rates.append(statistics.median(windows[1:] or windows))
    return rates


def time_recipe(name: str, steps: int, opts: recipes.RunOptions) -> tuple[list[str], list[float]] | str:
    """The names and measured steps/s of the recipe's own stages, or why they could not be measured here."""
    recipe, record = recipes.override(recipes.load(name), stage_steps=steps)
    start = None
    if recipe.start:
        start = WEIGHTS / Path(recipe.start).stem
        if not start.with_suffix(".json").exists():
            return f"needs {start}.json, a checkpoint of its start recipe"
    try:
        recipes.build_source(recipe.data)
    except (OSError, ValueError):
        return f"no {recipe.data.source} data on this machine"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        recipes.run(recipe, Path(tmp) / "run", opts, record, start_checkpoint=start)
        skip = recipes.start_from(recipe, start)[0] if start is not None else 0
        return [s.name for s in recipe.stages[skip:]], stage_rates(Path(tmp) / "run", recipe, skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=None, help="recipe names (default: every recipe)")
    p.add_argument("--steps", type=int, default=60, help="steps each stage is timed for")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=recipes.PRECISIONS)
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    opts = recipes.RunOptions(device=args.device, precision=args.precision, log_every=max(1, args.steps // 4),
                              sample_every=0, checkpoint_every=0, progress=False)
    measured = {row["name"]: row["measured"] for row in recipes.listing(WEIGHTS)}
    estimates: dict[str, float] = {}  # minutes from scratch
    rows = []
    for name in args.recipes or recipes.available():
        recipe = recipes.load(name)
        got = time_recipe(name, args.steps, opts)
        m = measured.get(name)
        full = f"{m['minutes']:.1f} on {m['device']} ({m['stages']} of {len(recipe.stages)} stages)" if m else ""
        if isinstance(got, str):
            rows.append([name, recipe.data.source, str(len(recipe.stages)), f"{recipe.total_steps:,}", got, "", full])
            print(rows[-1], flush=True)
            continue
        stage_names, rates = got
        own = {s.name: s.steps for s in recipe.stages}
        minutes = sum(own[n] / r for n, r in zip(stage_names, rates)) / 60
        base = Path(recipe.start).stem if recipe.start else ""
        if base and base not in estimates:
            estimate = f"{minutes:.0f} for its own stages (+ {base}, not timed in this run)"
        else:
            minutes += estimates.get(base, 0.0)
            estimate = f"{minutes:.0f}"
            estimates[name] = minutes
        per_stage = ", ".join(f"{n} {r:.2f}" for n, r in zip(stage_names, rates))
        rows.append([name, recipe.data.source, str(len(recipe.stages)), f"{recipe.total_steps:,}", per_stage, estimate,
                     full])
        print(rows[-1], flush=True)
    body = table(["recipe", "data", "stages", "steps", "steps/s per stage (own stages)", "estimated minutes from scratch",
                  "measured minutes (shipped card)"], rows)
    note = (f"\nEach stage trained {args.steps} steps (precision `{args.precision}`); its rate is the median of the "
            "training loop's logged windows after the first. A mask recipe's estimate adds its plain start recipe's. "
            "The estimate leaves out checkpoint and sample writing and the final out-of-domain calibration (a minute "
            "or two per recipe).\n")
    print(body)
    if args.write:
        write_section("recipes", "Training recipe wall time", body + "\n" + note)


if __name__ == "__main__":
    main()
