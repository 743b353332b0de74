"""The `did` command line: `did train`, `did data preview`, `did data samples` (and the service's `did serve` where
installed).

`python -m training FLAGS` is `did train FLAGS`, so `torchrun ... -m training FLAGS` launches the same run on any
number of processes and nodes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence



def _pairs(values: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE arguments of a repeatable flag, as a dict."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} takes NAME=VALUE, not {item!r}")
        out[name.strip()] = value.strip()
    return out


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `did train` (and `python -m training`): the recipe, its data, overrides and how to run it. The
    data flags are the fields of `recipes.Data`, the run flags those of `recipes.RunOptions`."""
    import dataclasses

    from .recipes import PRECISIONS, Data, RunOptions

    p.add_argument("--recipe", metavar="NAME", help="training/recipes/NAME.toml or a path to a .toml file (`did recipes` lists them; "
                                    "default: the pair's shipped recipe for a synthetic or digit pair, `paper` for celeba, `folders` for folders)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory; re-run the same command to continue")
    data = p.add_argument_group("data (overrides the recipe's [data])")
    for f in dataclasses.fields(Data):
        flag = "--data" if f.name == "source" else f"--{f.name.replace('_', '-')}"
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        data.add_argument(flag, dest=f"data_{f.name}", type=kind, metavar=f.name.upper(), help=f.metadata["help"])
    over = p.add_argument_group("overrides (recorded in the card)")
    over.add_argument("--weight", action="append", default=[], metavar="TERM=W",
                      help="a loss term's weight in every stage it applies to; repeatable (`did terms` lists them)")
    over.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a recipe or stage setting (lr, batch_size, steps, common_noise, width, seed, save_dtype, ...)"
                           " in every stage; repeatable")
    over.add_argument("--stage-steps", type=int, metavar="N", help="every stage runs N steps only (smoke tests)")
    over.add_argument("--start-from", type=Path, metavar="CHECKPOINT",
                      help="a checkpoint of the recipe's start recipe (e.g. weights/smile_glasses for "
                           "smile_glasses_mask): its stages are not run, the recipe's own start from its weights")
    run = p.add_argument_group("run (not overrides: the card records the device and precision)")
    d = RunOptions()
    run.add_argument("--device", default=d.device, metavar="DEV", help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--max-minutes", type=float, default=d.max_minutes, metavar="M",
                     help="stop and save after this many minutes (0: no limit); re-run to continue")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N", help="steps between checkpoints")
    run.add_argument("--sample-every", type=int, default=d.sample_every, metavar="N", help="steps between sample grids (0: at stage ends)")
    run.add_argument("--log-every", type=int, default=d.log_every, metavar="N", help="steps between log.jsonl lines")
    run.add_argument("--num-workers", type=int, default=d.num_workers, metavar="N", help="image-decoding workers for file data")
    run.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                     help="auto: bf16 autocast on CUDA, float32 on the CPU; bf16 on a CPU needs AVX512-BF16 or AMX")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from . import recipes
    from .recipes import RunOptions

    data = {f.name: getattr(args, f"data_{f.name}") for f in dataclasses.fields(recipes.Data)}
    data = {k: v for k, v in data.items() if v is not None}
    name = args.recipe or recipes.default_for(recipes.Data(**{k: v for k, v in data.items() if k in ("source", "pair")}))
    weights = {}
    for term, value in _pairs(args.weight, "--weight").items():
        try:
            weights[term] = float(value)
        except ValueError:
            raise ValueError(f"--weight {term}={value}: the weight must be a number") from None
    recipe, record = recipes.override(recipes.load(name), weights=weights, settings=_pairs(args.set, "--set"),
                                      data=data, stage_steps=args.stage_steps)
    for key in ("log_every", "checkpoint_every", "sample_every"):
        if getattr(args, key) < (1 if key == "log_every" else 0):
            raise ValueError(f"--{key.replace('_', '-')} must be at least {1 if key == 'log_every' else 0}")
    opts = RunOptions(device=args.device, precision=args.precision, log_every=args.log_every, sample_every=args.sample_every,
                      checkpoint_every=args.checkpoint_every, num_workers=args.num_workers, progress=args.progress,
                      max_minutes=args.max_minutes)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if main_rank:
        logging.getLogger("did").info("recipe %s: %d stage(s), %d steps -> %s", recipe.name, len(recipe.stages),
                                      recipe.total_steps, args.out)
    card = recipes.run(recipe, args.out, opts, record, start_checkpoint=args.start_from)
    if main_rank:
        if card is None:
            print(f"stopped by --max-minutes; run the same command again to continue {args.out}")
        else:
            logging.getLogger("did").info("wrote %s", card)
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    from . import recipes

    for row in recipes.listing(args.weights):
        m = row["measured"]
        part = "" if not m or m["stages"] == row["stages"] else f", {m['stages']} of its stages"
        wall = f"{m['minutes']:.0f} min on {m['device']} ({m['checkpoint']}{part})" if m else "not measured"
        print(f"{row['name']:<20} {row['data']:<30} {row['variant']:<6} {row['stages']} stage(s) "
              f"{row['steps']:>7,} steps  {wall}")
    return 0


def run_terms(args: argparse.Namespace) -> int:
    from .terms import TERMS

    for t in TERMS.values():
        where = "/".join(t.variants)
        print(f"{t.name:<20} {where:<10} {t.paper or 'ours':<19} {t.formula}")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    import torch

    from models.images import save_grid

    from .synthetic import render_domain

    from .digits import DIGIT_PAIRS, IMAGE_SIZE, labelled

    per_domain = max(1, args.n // 2)
    if args.pair in DIGIT_PAIRS:  # the training digits of each domain, at their own 32 px
        images = torch.cat([labelled(d, "train", seed=args.seed, n=per_domain, root=args.root)[0]
                            for d in DIGIT_PAIRS[args.pair]])
        size = IMAGE_SIZE
    else:
        idx = torch.arange(per_domain)
        images = torch.cat([render_domain(args.pair, dom, idx, size=args.image_size, seed=args.seed) for dom in ("a", "b")])
        size = args.image_size
    path = save_grid(images, args.out, nrow=per_domain)
    print(f"wrote {path}: top row(s) domain a, then domain b of {args.pair} ({per_domain} each, {size} px)")
    return 0


SAMPLES_SEED = 2024  # the faces of examples/: unseen in training and apart from the evaluation's


def run_samples(args: argparse.Namespace) -> int:
    """N faces per kind (domain a, domain b, neither attribute) as `{label}-{i}.png`, and DIR/index.json listing
    them. Face i of kind k is face 3i + k of the seed, so the kinds are different people and a larger N keeps the
    first faces."""
    import json

    import torch

    from models.images import to_pil

    from .digits import DIGIT_PAIRS
    from .synthetic import ATTRIBUTES, PAIRS, SIZES, pair_domain, render, sample_faces

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, not {args.n}")
    if args.pair in DIGIT_PAIRS:
        return _digit_samples(args)
    args.size = args.size or 64
    if args.pair not in PAIRS:
        raise ValueError(f"unknown pair {args.pair!r}; expected one of {tuple(PAIRS) + tuple(DIGIT_PAIRS)}")
    if args.size not in SIZES:
        raise ValueError(f"--size must be one of {SIZES}, not {args.size}")
    kinds = [(PAIRS[args.pair][0], pair_domain(args.pair, "a")), (PAIRS[args.pair][1], pair_domain(args.pair, "b")),
             ("neither", dict.fromkeys(ATTRIBUTES, False))]
    args.out.mkdir(parents=True, exist_ok=True)
    samples = []
    for k, (label, present) in enumerate(kinds):
        images = render(sample_faces(torch.arange(args.n) * len(kinds) + k, args.seed, present), args.size)
        for i, image in enumerate(images):
            name = f"{label}-{i}.png"
            to_pil(image).save(args.out / name, optimize=True)
            samples.append({"file": name, "label": label, "attributes": present})
    index = {"pair": args.pair, "size": args.size, "seed": args.seed, "samples": samples}
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(samples)} PNGs and index.json to {args.out}: {args.n} each of {', '.join(k for k, _ in kinds)} "
          f"({args.size} px, seed {args.seed})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from models import Disentangler, checkpoint, resolve_device

    from . import evaluate, judge

    device = resolve_device(args.device)
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    if args.data == "celeba" and args.root is None:
        raise ValueError("--data celeba needs --root (the CelebA folder)")
    model = checkpoint.load(args.model, device=device)
    others = [checkpoint.load(path, device=device) for path in args.compare]
    for path, other in zip(args.compare, others):
        if (other.config.domain_a, other.config.domain_b, other.config.image_size) != (
                model.config.domain_a, model.config.domain_b, model.config.image_size):
            raise ValueError(f"--compare {path}: domains {other.config.domain_a}/{other.config.domain_b} at "
                             f"{other.config.image_size} px differ from the model's; only like models compare")
    pair = evaluate.digit_pair(model)
    data = args.data or ("digits" if pair is not None else "synthetic")
    if (data == "digits") != (pair is not None):
        raise ValueError(f"--data {data}: the model's domains are {model.config.domain_a}/{model.config.domain_b}"
                         + (", a digit pair (--data digits)" if pair else ", not digit domains"))
    if data == "digits":
        measure, figures = _digit_measures(args, model, device)
    else:
        judge_model = judge.load(args.judge, device)

        def measure(m: Disentangler, path: Path) -> dict[str, Any]:
            if data == "celeba":
                return evaluate.evaluate_celeba(m, judge_model, root=args.root, n=args.n, batch=args.batch,
                                                model_path=path, judge_path=args.judge)
            return evaluate.evaluate(m, judge_model, n=args.n, seed=args.seed, batch=args.batch, model_path=path,
                                     judge_path=args.judge, dtype=checkpoint.DTYPES[args.dtype])

        def figures() -> list[Path]:
            from .figures import evaluation_figures

            return evaluation_figures(model, args.figures, seed=args.seed)

    result = measure(model, args.model)
    compared = [measure(other, path) for path, other in zip(args.compare, others)]
    if args.record:
        print(f"recorded the headline metrics in {evaluate.record_in_card(args.model, result)}")
    if args.json:
        print("wrote " + ", ".join(map(str, evaluate.write(result, args.json, compared=compared))))
    print(evaluate.report([result, *compared]), end="")
    if args.figures:
        for path in figures():
            print(f"wrote {path}")
    return 0


def _digit_measures(args: argparse.Namespace, model, device) -> tuple[Callable, Callable[[], list[Path]]]:
    """`did eval` of a digits model: (measure(model, path), figures()) of the domain adaptation read by each
    domain's digit classifier (DIR/digits_<domain> of --digit-judges)."""
    from models import checkpoint

    from . import digit_judge, evaluate

    domains = (model.config.domain_a, model.config.domain_b)
    paths = {d: digit_judge.default_path(d, args.digit_judges) for d in domains}
    judges = {d: digit_judge.load(p, device, domain=d) for d, p in paths.items()}

    def measure(m, path: Path) -> dict[str, Any]:
        return evaluate.evaluate_digits(m, judges, n=args.n, seed=args.seed, batch=args.batch, model_path=path,
                                        judge_paths=paths, root=args.root, dtype=checkpoint.DTYPES[args.dtype])

    def figures() -> list[Path]:
        from .figures import digit_figures

        return digit_figures(model, args.figures, seed=args.seed, root=args.root)

    return measure, figures


def run_export(args: argparse.Namespace) -> int:
    """Copy a run's checkpoint into a weights directory under its serving name, in the storage dtype asked for, and
    calibrate the copy (its own dtype's reconstructions)."""
    from models import checkpoint
    from models.framing import framing_of

    from .recipes import source_class

    model = checkpoint.load(args.run)
    card = model.card
    dtype = args.dtype or card["tensors"].get("dtype", "float32")
    kind = card.get("training", {}).get("data", {}).get("kind")
    # A card that names no framing takes its training data's (the source class's), not framing_of's "none".
    framing = framing_of(card) if "framing" in card or not kind else source_class(kind).framing
    out = checkpoint.save(model, args.out, training=card.get("training", {}), metrics=card.get("metrics", {}), dtype=dtype,
                          framing=framing, notes=args.notes if args.notes is not None else card.get("notes"))
    print(f"wrote {out} ({dtype})")
    if args.calibration_n:
        from .calibration import calibrate_checkpoint

        if not card.get("training", {}).get("data", {}).get("kind"):
            print(f"{out}: not calibrated: its card names no training data (`did calibrate` needs it)", file=sys.stderr)
            return 0
        calibrate_checkpoint(out, n=args.calibration_n)
        print(f"wrote the out-of-domain calibration of {out} ({args.calibration_n} images)")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure the out-of-domain calibration of a checkpoint on its training data and write it into its card."""
    from models import resolve_device

    from .calibration import calibrate_checkpoint

    card, result = calibrate_checkpoint(args.model, n=args.n, batch_size=args.batch_size, device=resolve_device(args.device))
    p = result.percentiles
    print(f"wrote the calibration of {card} ({result.n} images): error p50 {p['p50']:.4f} p99 {p['p99']:.4f} "
          f"p99.9 {p['p99.9']:.4f} max {p['max']:.4f}; {result.rule}")
    return 0


def run_judge_train(args: argparse.Namespace) -> int:
    from models import resolve_device

    from .judge import train_and_save

    device = str(resolve_device(args.device))
    if args.data == "digits":
        from . import digit_judge

        if args.domain is None:
            raise ValueError("--data digits needs --domain (the digit domain to classify)")
        card = digit_judge.train_and_save(args.out, args.domain, steps=args.steps or digit_judge.STEPS,
                                          batch=args.batch_size or digit_judge.BATCH, device=device,
                                          progress=args.progress, root=args.root)
        print(f"wrote {card}")
        return 0
    if args.domain is not None:
        raise ValueError("--domain names a digit domain: it goes with --data digits")
    if args.data == "celeba" and args.root is None:
        raise ValueError("--data celeba needs --root (the CelebA folder)")
    card = train_and_save(args.out, steps=args.steps or 1500, batch=args.batch_size or 128, device=device, test_n=args.test_n,
                          progress=args.progress, celeba_root=args.root if args.data == "celeba" else None)
    print(f"wrote {card}")
    return 0


def _digit_samples(args: argparse.Namespace) -> int:
    """`did data samples` of a digit pair: N test digits of each domain as `{domain}-{i}-digit{d}.png` at 32 px, and
    DIR/index.json with each file's domain and digit. The digits are `digits.labelled(domain, "test", seed, n)`."""
    import json

    from models.images import to_pil

    from .digits import DIGIT_PAIRS, IMAGE_SIZE, labelled

    if args.size not in (None, IMAGE_SIZE):
        raise ValueError(f"digits are {IMAGE_SIZE} px: --size {IMAGE_SIZE}, not {args.size}")
    args.out.mkdir(parents=True, exist_ok=True)
    samples = []
    for domain in DIGIT_PAIRS[args.pair]:
        images, labels = labelled(domain, "test", seed=args.seed, n=args.n, root=args.root)
        for i, (image, digit) in enumerate(zip(images, labels.tolist())):
            name = f"{domain}-{i}-digit{digit}.png"
            to_pil(image).save(args.out / name, optimize=True)
            samples.append({"file": name, "label": domain, "digit": digit})
    index = {"pair": args.pair, "size": IMAGE_SIZE, "seed": args.seed, "samples": samples}
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(samples)} PNGs and index.json to {args.out}: {args.n} test digits each of "
          f"{', '.join(DIGIT_PAIRS[args.pair])} ({IMAGE_SIZE} px, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.checkpoint import DTYPES

    from . import digit_judge, synthetic
    from .calibration import DEFAULT_N
    from .digits import DIGIT_DOMAINS, DIGIT_PAIRS

    p = argparse.ArgumentParser(prog="did", description="Domain intersection and domain difference: train, preview data, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe's stages (same flags as `python -m training`, which torchrun launches)",
                       description="Train every stage of a recipe (training/recipes/) in order into --out.")
    add_train_arguments(t)
    t.set_defaults(func=run_train)

    rc = sub.add_parser("recipes", help="list the training recipes: data, variant, stages, steps, measured wall time")
    rc.add_argument("--weights", type=Path, default=Path("weights"), help="where to look for the checkpoints that "
                                                                          "measured each recipe (default weights)")
    rc.set_defaults(func=run_recipes)
    tm = sub.add_parser("terms", help="list the loss terms a recipe can weight: variants, paper, formula")
    tm.set_defaults(func=run_terms)

    data = sub.add_parser("data", help="look at training data").add_subparsers(dest="data_command", required=True)
    pv = data.add_parser("preview", help="render synthetic benchmark samples (or a digit pair's training digits) "
                                         "into one PNG grid")
    pv.add_argument("--pair", default="smile_glasses", choices=tuple(synthetic.PAIRS) + tuple(DIGIT_PAIRS))
    pv.add_argument("--root", type=Path, help="digit pairs: the folder of your MNIST / SVHN files (default: the "
                                              "bundled MNIST digits; SVHN has none bundled)")
    pv.add_argument("--n", type=int, default=16, help="images in all, half per domain")
    pv.add_argument("--image-size", type=int, default=128)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out", type=Path, default=Path("preview.png"))
    pv.set_defaults(func=run_preview)
    sm = data.add_parser("samples", help="write sample PNGs of each domain and of neither, with an index.json (examples/)",
                         description="Write N synthetic faces of each kind of a pair (domain a, domain b, neither "
                                     "attribute) as DIR/{label}-{i}.png, and DIR/index.json listing each file's label and "
                                     "attributes.")
    sm.add_argument("--pair", required=True, choices=tuple(synthetic.PAIRS) + tuple(DIGIT_PAIRS),
                    help="a face pair, or a digit pair (then N test digits of each domain, 32 px, the digit in the name)")
    sm.add_argument("--root", type=Path, help="digit pairs: the folder of your MNIST / SVHN files")
    sm.add_argument("--out", type=Path, required=True, metavar="DIR")
    sm.add_argument("--n", type=int, default=3, help="faces per kind (default 3)")
    sm.add_argument("--size", type=int, help="pixels per side (default 64, the bundled face models' size; digits: 32)")
    sm.add_argument("--seed", type=int, default=SAMPLES_SEED,
                    help=f"face seed (default {SAMPLES_SEED}: neither the training seed {synthetic.TRAIN_SEED} nor the "
                         f"evaluation seeds {synthetic.VALIDATION_SEED} and {synthetic.TEST_SEED})")
    sm.set_defaults(func=run_samples)

    ev = sub.add_parser("eval", help="measure a checkpoint: membership, removal, ground truth, KID/FID, similarity, masks")
    ev.add_argument("--model", type=Path, required=True, help="checkpoint (DIR/NAME, NAME.json or a run directory)")
    ev.add_argument("--data", choices=("synthetic", "celeba", "digits"),
                    help="test data (default: digits for a model of digit domains, else synthetic)")
    ev.add_argument("--root", type=Path, help="CelebA root (--data celeba): its test split is used; for digits, the "
                                              "folder of the MNIST / SVHN files (default: the bundled digits)")
    ev.add_argument("--judge", type=Path, default=Path("weights/judge/judge"), help="attribute classifier (default weights/judge/judge)")
    ev.add_argument("--digit-judges", type=Path, default=digit_judge.WEIGHTS, metavar="DIR",
                    help=f"digits models: the folder of the digit classifiers DIR/digits_<domain> (default {digit_judge.WEIGHTS})")
    ev.add_argument("--n", type=int, default=512, help="test images per domain (default 512)")
    ev.add_argument("--seed", type=int, default=synthetic.TEST_SEED,
                    help=f"synthetic test seed (default {synthetic.TEST_SEED}, never used in training; "
                         f"{synthetic.VALIDATION_SEED} is the validation seed, for choosing among checkpoints); for "
                         "digits, the sample of the test split and the source-guide pairing")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ev.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                    help="compute in this dtype (as DID_DTYPE serves); below float32 each edit is also compared with "
                         "the float32 model's output (synthetic data)")
    ev.add_argument("--json", type=Path, help="write the results here (and a markdown table beside it, .md)")
    ev.add_argument("--figures", type=Path, help="write the transfer grids, intersection, removal and interpolation figures here")
    ev.add_argument("--compare", type=Path, action="append", default=[], metavar="CHECKPOINT",
                    help="also measure this checkpoint (same domains and size) on the same faces, side by side in the "
                         "tables, its JSON beside --json's as NAME.vs-OTHER.json; repeatable")
    ev.add_argument("--record", action="store_true", help="also write the headline metrics into the model card (tensors untouched)")
    ev.set_defaults(func=run_eval)

    ex = sub.add_parser("export", help="copy a run's checkpoint into a weights directory (e.g. weights/NAME) for serving")
    ex.add_argument("run", type=Path, help="run directory or checkpoint")
    ex.add_argument("out", type=Path, help="destination DIR/NAME (writes NAME.json + NAME.safetensors)")
    ex.add_argument("--dtype", choices=tuple(DTYPES), help="storage dtype (default: the run's)")
    ex.add_argument("--notes", help="free text for the card's readers: how and where it was trained, what it does not do "
                                    "well (default: the run card's notes, if any)")
    ex.add_argument("--calibration-n", type=int, default=DEFAULT_N, metavar="N",
                    help=f"training images the out-of-domain calibration is measured on (default {DEFAULT_N}; 0: none)")
    ex.set_defaults(func=run_export)

    ca = sub.add_parser("calibrate", help="measure a checkpoint's out-of-domain threshold and write it into its card",
                        description="Write the card's out-of-domain calibration: percentiles of the reconstruction "
                                    "error over images of the card's training data, and the threshold above which an "
                                    "image counts as unlike them. The tensors are left untouched.")
    ca.add_argument("--model", type=Path, required=True, help="checkpoint (DIR/NAME, NAME.json or a run directory)")
    ca.add_argument("--n", type=int, default=DEFAULT_N, help=f"images to measure (default {DEFAULT_N})")
    ca.add_argument("--batch-size", type=int, default=256)
    ca.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ca.set_defaults(func=run_calibrate)

    jd = sub.add_parser("judge", help="the attribute classifier of the evaluation").add_subparsers(dest="judge_command", required=True)
    jt = jd.add_parser("train", help="train the judge on labelled synthetic renders (or CelebA), or a digit classifier "
                                     "(--data digits), and record its test accuracy")
    jt.add_argument("--data", choices=("synthetic", "celeba", "digits"), default="synthetic")
    jt.add_argument("--domain", choices=DIGIT_DOMAINS,
                    help="--data digits: the domain whose labelled training digits the classifier learns "
                         f"(ship it as {digit_judge.WEIGHTS}/digits_<domain>)")
    jt.add_argument("--root", type=Path, help="CelebA root (--data celeba): trains on its train split, tests on its test "
                                              "split; --data digits: the folder of the MNIST / SVHN files")
    jt.add_argument("--out", type=Path, required=True,
                    help="checkpoint path (NAME.json + NAME.safetensors); the bundled weights/judge/judge is pinned by "
                         "sha256 in every evaluation, so write a new judge elsewhere")
    jt.add_argument("--steps", type=int, help=f"default 1500 (digits: {digit_judge.STEPS})")
    jt.add_argument("--batch-size", type=int, help=f"default 128 (digits: {digit_judge.BATCH})")
    jt.add_argument("--test-n", type=int, default=2000, help="clean test renders per size for the reported accuracy "
                                                             "(digits: the whole test split)")
    jt.add_argument("--device", default="auto")
    jt.add_argument("--no-progress", dest="progress", action="store_false")
    jt.set_defaults(func=run_judge_train)

    sub.add_parser("serve", add_help=False, help="serve every checkpoint of a weights directory over HTTP: the flags "
                   "and help of `did-serve` (other settings: DID_* variables)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the service's own command line, whose dependencies load only here
        from app.cli import main as serve_main

        return serve_main(argv[1:], prog="did serve")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user mistakes: one line, no traceback
        print(f"did: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("did: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
