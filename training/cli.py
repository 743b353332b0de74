"""The `did` command line: `did train`, `did data preview` (and the service's `did serve` where installed).

`python -m training FLAGS` is `did train FLAGS`, so `torchrun ... -m training FLAGS` launches the same run on any
number of processes and nodes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from models.config import PRESETS, VARIANTS


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `did train` (and `python -m training`)."""
    from .loop import WEIGHT_DEFAULTS, TrainConfig

    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--data", choices=("synthetic", "celeba", "folders"), default="synthetic",
                      help="synthetic face benchmark (default), CelebA, or two image folders")
    data.add_argument("--pair", default="smile_glasses", help="domain pair for synthetic/celeba: smile_glasses, beard_smile, beard_glasses")
    data.add_argument("--root", type=Path, help="CelebA root (img_align_celeba/, list_attr_celeba.txt)")
    data.add_argument("--split", default="train", choices=("train", "val", "test", "all"), help="CelebA partition (default train)")
    data.add_argument("--a", type=Path, help="folder of domain-a images (--data folders)")
    data.add_argument("--b", type=Path, help="folder of domain-b images (--data folders)")
    data.add_argument("--image-size", type=int, default=128, help="power of two from 64 to 256 (default 128)")
    data.add_argument("--num-workers", type=int, default=d.num_workers, help="image-decoding workers for file data")

    model = p.add_argument_group("model")
    model.add_argument("--width", choices=sorted(PRESETS), default=d.width, help="network widths (default: the published 'paper')")
    model.add_argument("--sep-channels", type=int, help="override: channels of each separate code")
    model.add_argument("--code-channels", type=int, help="override: channels of the whole code map")
    model.add_argument("--base-width", type=int,
                       help="override: channels of the first encoder layer (halving it at 128 px keeps a 64 px preset's "
                            "parameter count, as every later layer keeps its width)")
    model.add_argument("--variant", choices=VARIANTS, default=d.variant,
                       help="plain (Benaim et al. 2019, default) or mask (Mokady et al. 2020: the decoder also predicts "
                            "the attribute's mask and edits change only the pixels inside it). Switches every loss weight "
                            "left unset to that paper's defaults")

    w = {k: WEIGHT_DEFAULTS[k] for k in ("plain", "mask")}

    def by_variant(name: str) -> str:
        if not w["plain"][name]:  # a term of the mask variant alone
            return f"default {w['mask'][name]:g}"
        return f"default: {w['plain'][name]:g} plain, {w['mask'][name]:g} mask"

    opt = p.add_argument_group("optimisation (published defaults)",
                               "Loss weights not given take the defaults of --variant: the published values of its paper.")
    opt.add_argument("--steps", type=int, default=d.steps)
    opt.add_argument("--max-minutes", type=float, default=d.max_minutes,
                     help="stop and save after this many minutes of training even before --steps (0: no limit)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="images per domain per process")
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--beta1", type=float, default=d.betas[0])
    opt.add_argument("--beta2", type=float, default=d.betas[1])
    opt.add_argument("--recon-weight", type=float,
                     help=f"reconstruction of domain a (plain: of both unless --recon-weight-b); {by_variant('recon_weight')}")
    opt.add_argument("--recon-weight-b", type=float,
                     help="reconstruction of domain b; default: --recon-weight plain, "
                          f"{w['mask']['recon_weight_b']:g} mask")
    opt.add_argument("--zero-weight", type=float, default=d.zero_weight)
    opt.add_argument("--adv-weight", type=float, help=f"common-space adversary; {by_variant('adv_weight')}")
    opt.add_argument("--mask-recon-weight", type=float,
                     help=f"mask variant: the attribute decoder drawn through its mask over the real image, each domain; {by_variant('mask_recon_weight')}")
    opt.add_argument("--cycle-weight-a", type=float,
                     help=f"mask variant: code cycle of a's images given b's attribute; {by_variant('cycle_weight_a')}")
    opt.add_argument("--cycle-weight-b", type=float,
                     help=f"mask variant: code cycle of b's images given a's attribute; {by_variant('cycle_weight_b')}")
    opt.add_argument("--mask-weight", type=float,
                     help=f"mask variant: extra sparsity, the mean of the masks; {by_variant('mask_weight')}")
    opt.add_argument("--structure-weight", type=float, default=d.structure_weight,
                     help="add W * (1 - SSIM) to each reconstruction (not in the papers; default 0: L1 only); "
                          "makes thin features such as a mouth learnable early")
    opt.add_argument("--removal-weight", type=float, default=d.removal_weight,
                     help="add W * |E_s(G(E_c(x), 0, 0))|, the separate encoders' answer on the attribute-free "
                          "decode (not in the papers; default 0); charges what the common code leaks into it")
    opt.add_argument("--masked-removal-weight", type=float, default=d.masked_removal_weight,
                     help="mask variant: add W * |E_s(m G(E_c(x), 0, 0) + (1 - m) x)|, the separate encoders' "
                          "answer on the removal drawn through the image's own mask (not in the papers; default 0); "
                          "charges the attribute a mask leaves uncovered")
    opt.add_argument("--translated-own-weight", type=float, default=d.translated_own_weight,
                     help="mask variant: add W * |E_sA(t_a)| + |E_sB(t_b)| on the translations, the content's own "
                          "attribute read by its separate encoder (not in the papers; default 0); charges an "
                          "attribute the common code draws back under the other attribute's mask")
    opt.add_argument("--translated-guide-weight", type=float, default=d.translated_guide_weight,
                     help="mask variant: add W * |E_sB(t_a) - s_B| + |E_sA(t_b) - s_A| on the translations, the guide's "
                          "attribute read back by detached separate encoders (not in the papers; default 0); charges "
                          "a translation that draws the guide's attribute too faintly to carry its code")
    opt.add_argument("--common-noise", type=float, default=d.common_noise,
                     help="train the decoder on E_c(x) plus Gaussian noise of this std relative to the code's RMS "
                          "(not in the papers; default 0): a bottleneck that keeps attributes out of the common code")
    opt.add_argument("--neither-weight", type=float, default=d.neither_weight,
                     help="add W * L1(G(E_c(n), 0, 0), n) for faces n with neither attribute, and the zero term on "
                          "them (synthetic data; not in the papers; default 0): trains the attribute-free decode that "
                          "removal uses and training otherwise never sees")
    opt.add_argument("--neither-adversary", action="store_true",
                     help="with --neither-weight: the latent discriminator tells A, B and the neither faces apart, "
                          "and the encoders push A's and B's common codes towards the neither group (not in the papers)")
    opt.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip for both nets")
    opt.add_argument("--disc-steps", type=int, default=d.disc_steps,
                     help="latent-discriminator updates per generator update (default 1, as published)")
    opt.add_argument("--seed", type=int, default=d.seed)
    opt.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA instead of bf16 autocast")

    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log.jsonl, samples/, train_state.pt)")
    run.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    run.add_argument("--freeze-encoders", action="store_true",
                     help="train the decoder alone, on the codes of the starting (--init) checkpoint's encoders")
    run.add_argument("--init", metavar="CHECKPOINT", default="",
                     help="start from this checkpoint's weights (fine-tuning; a plain checkpoint can start a mask model "
                          "of the same sizes, which then learns only its mask channel from scratch)")
    run.add_argument("--log-every", type=int, default=d.log_every)
    run.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids (0: only at the end)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints (0: only at the end)")
    run.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default=d.save_dtype,
                     help="dtype of the inference checkpoint's tensors (training state stays fp32)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (log.jsonl is still written)")


def build_source(args: argparse.Namespace):
    """The data source the flags name."""
    if args.data == "synthetic":
        from .synthetic import SyntheticPairs

        return SyntheticPairs(args.pair, image_size=args.image_size)
    if args.data == "celeba":
        if args.root is None:
            raise ValueError("--data celeba needs --root (the folder holding img_align_celeba/ and list_attr_celeba.txt)")
        from .data import CelebAPairs

        return CelebAPairs(args.root, args.pair, image_size=args.image_size, split=args.split)
    if args.a is None or args.b is None:
        raise ValueError("--data folders needs --a DIR_A and --b DIR_B")
    from .data import ImageFolderPairs

    return ImageFolderPairs(args.a, args.b, image_size=args.image_size)


def run_train(args: argparse.Namespace) -> int:
    from .loop import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("sep_channels", "code_channels", "base_width") if getattr(args, k) is not None}
    cfg = TrainConfig(
        out=str(args.out), steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, width=args.width, lr=args.lr,
        betas=(args.beta1, args.beta2), variant=args.variant, recon_weight=args.recon_weight,
        recon_weight_b=args.recon_weight_b, zero_weight=args.zero_weight, adv_weight=args.adv_weight,
        mask_recon_weight=args.mask_recon_weight, cycle_weight_a=args.cycle_weight_a, cycle_weight_b=args.cycle_weight_b,
        mask_weight=args.mask_weight, structure_weight=args.structure_weight, removal_weight=args.removal_weight,
        masked_removal_weight=args.masked_removal_weight, translated_own_weight=args.translated_own_weight,
        translated_guide_weight=args.translated_guide_weight,
        common_noise=args.common_noise, neither_weight=args.neither_weight, neither_adversary=args.neither_adversary,
        clip=args.clip, disc_steps=args.disc_steps,
        seed=args.seed, device=args.device, amp=args.amp,
        log_every=args.log_every, sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
        save_dtype=args.save_dtype, num_workers=args.num_workers, resume=args.resume, init=args.init, freeze_encoders=args.freeze_encoders, progress=args.progress,
        model_overrides=overrides,
    )
    if cfg.freeze_encoders and not (cfg.init or cfg.resume):
        raise ValueError("--freeze-encoders needs --init CHECKPOINT: frozen encoders of a fresh model give random codes")
    for name in ("steps", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    card = train(cfg, build_source(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes, so only it reports
        logging.getLogger("did").info("wrote %s", card)
    return 0


def run_preview(args: argparse.Namespace) -> int:
    import torch

    from models.images import save_grid

    from .synthetic import render_domain

    per_domain = max(1, args.n // 2)
    idx = torch.arange(per_domain)
    images = torch.cat([render_domain(args.pair, dom, idx, size=args.image_size, seed=args.seed) for dom in ("a", "b")])
    path = save_grid(images, args.out, nrow=per_domain)
    print(f"wrote {path}: top row(s) domain a, then domain b of {args.pair} ({per_domain} each, {args.image_size} px)")
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
    judge_model = judge.load(args.judge, device)

    def measure(m: Disentangler, path: Path) -> dict[str, Any]:
        if args.data == "celeba":
            return evaluate.evaluate_celeba(m, judge_model, root=args.root, n=args.n, batch=args.batch,
                                            model_path=path, judge_path=args.judge)
        return evaluate.evaluate(m, judge_model, n=args.n, seed=args.seed, batch=args.batch, model_path=path,
                                 judge_path=args.judge)

    result = measure(model, args.model)
    compared = [measure(other, path) for path, other in zip(args.compare, others)]
    if args.record:
        print(f"recorded the headline metrics in {evaluate.record_in_card(args.model, result)}")
    if args.json:
        print("wrote " + ", ".join(map(str, evaluate.write(result, args.json, compared=compared))))
    print(evaluate.report([result, *compared]), end="")
    if args.figures:
        from .figures import evaluation_figures

        for path in evaluation_figures(model, args.figures, seed=args.seed):
            print(f"wrote {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Copy a run's checkpoint into a weights directory under its serving name, in the storage dtype asked for."""
    from models import checkpoint

    model = checkpoint.load(args.run)
    card = model.card
    dtype = args.dtype or card["tensors"].get("dtype", "float32")
    out = checkpoint.save(model, args.out, training=card.get("training", {}), metrics=card.get("metrics", {}), dtype=dtype,
                          notes=args.notes if args.notes is not None else card.get("notes"))
    print(f"wrote {out} ({dtype})")
    return 0


def run_judge_train(args: argparse.Namespace) -> int:
    from models import resolve_device

    from .judge import train_and_save

    device = str(resolve_device(args.device))
    if args.data == "celeba" and args.root is None:
        raise ValueError("--data celeba needs --root (the CelebA folder)")
    card = train_and_save(args.out, steps=args.steps, batch=args.batch_size, device=device, test_n=args.test_n,
                          progress=args.progress, celeba_root=args.root if args.data == "celeba" else None)
    print(f"wrote {card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import synthetic

    p = argparse.ArgumentParser(prog="did", description="Domain intersection and domain difference: train, preview data, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (same flags as `python -m training`, which torchrun launches)")
    add_train_arguments(t)
    t.set_defaults(func=run_train)

    data = sub.add_parser("data", help="look at training data").add_subparsers(dest="data_command", required=True)
    pv = data.add_parser("preview", help="render synthetic benchmark samples into one PNG grid")
    pv.add_argument("--pair", default="smile_glasses")
    pv.add_argument("--n", type=int, default=16, help="images in all, half per domain")
    pv.add_argument("--image-size", type=int, default=128)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out", type=Path, default=Path("preview.png"))
    pv.set_defaults(func=run_preview)

    ev = sub.add_parser("eval", help="measure a checkpoint: membership, removal, ground truth, KID/FID, similarity, masks")
    ev.add_argument("--model", type=Path, required=True, help="checkpoint (DIR/NAME, NAME.json or a run directory)")
    ev.add_argument("--data", choices=("synthetic", "celeba"), default="synthetic")
    ev.add_argument("--root", type=Path, help="CelebA root (--data celeba): its test split is used")
    ev.add_argument("--judge", type=Path, default=Path("weights/judge/judge"), help="attribute classifier (default weights/judge/judge)")
    ev.add_argument("--n", type=int, default=512, help="test images per domain (default 512)")
    ev.add_argument("--seed", type=int, default=synthetic.TEST_SEED,
                    help=f"synthetic test seed (default {synthetic.TEST_SEED}, never used in training; "
                         f"{synthetic.VALIDATION_SEED} is the validation seed, for choosing among checkpoints)")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
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
    ex.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="storage dtype (default: the run's)")
    ex.add_argument("--notes", help="free text for the card's readers: how and where it was trained, what it does not do "
                                    "well (default: the run card's notes, if any)")
    ex.set_defaults(func=run_export)

    jd = sub.add_parser("judge", help="the attribute classifier of the evaluation").add_subparsers(dest="judge_command", required=True)
    jt = jd.add_parser("train", help="train the judge on labelled synthetic renders (or CelebA) and record its test accuracy")
    jt.add_argument("--data", choices=("synthetic", "celeba"), default="synthetic")
    jt.add_argument("--root", type=Path, help="CelebA root (--data celeba): trains on its train split, tests on its test split")
    jt.add_argument("--out", type=Path, default=Path("weights/judge/judge"), help="checkpoint path (NAME.json + NAME.safetensors)")
    jt.add_argument("--steps", type=int, default=1500)
    jt.add_argument("--batch-size", type=int, default=128)
    jt.add_argument("--test-n", type=int, default=2000, help="clean test renders per size for the reported accuracy")
    jt.add_argument("--device", default="auto")
    jt.add_argument("--no-progress", dest="progress", action="store_false")
    jt.set_defaults(func=run_judge_train)

    sv = sub.add_parser("serve", help="serve every checkpoint of a weights directory over HTTP (other settings: DID_* variables)")
    sv.add_argument("--host", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="TCP port (default 8000)")
    sv.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    sv.add_argument("--weights", type=Path, help="directory of checkpoints to load (default weights)")
    sv.add_argument("--device", help="auto (CUDA when present), cuda, cuda:N or cpu")
    sv.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from app.cli import serve  # the service's dependencies load only for `did serve`

    return serve(args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # user mistakes: one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"did: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("did: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
