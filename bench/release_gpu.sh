#!/usr/bin/env bash
# One GPU, one command: trains the shipped checkpoints (smile_glasses, beard_smile, beard_glasses and the
# mask models of all three pairs, 128 px, slim widths, fp16 storage), the loss ablation of smile_glasses and the judge,
# all at once on the one GPU (each training is a separate process with the same time budget), then runs the GPU
# benchmarks on the idle GPU. Every run writes into $OUT/<name>/ (checkpoint, log.jsonl, samples/).
#
#   OUT=runs/release MINUTES=5 bash bench/release_gpu.sh
#
# MINUTES is the training time of every run (--max-minutes; each stops and saves at the first log step past it).
# ADV is the common-space adversary weight of the shipped plain models; the published 0.001 is trained beside
# it as `published_adv` for comparison. RUNS picks the trainings (default: all eleven). EVAL=0 skips the
# evaluation, BENCH=0 the benchmarks, HTTP=0 the HTTP one. PACK=DIR puts everything into a few tar files there.
# STRUCTURE is --structure-weight for every run (1: the SSIM term that lets the smile be learned; 0: L1 alone, as
# published); it needs pytorch-msssim installed. The mask model adds --removal-weight MASK_REMOVAL (default 5: without
# it the attribute-free decode draws the glasses itself and the mask never opens on them) at adversarial weight
# MASK_ADV (default 0.12, the plain 0.02 scaled by the mask losses' reconstruction weights) and
# --masked-removal-weight MASKED_REMOVAL (default 10: the removal drawn through the mask must lose the attribute, so
# the mask covers all of it; 0 turns it off); the three mask models also take --mask-weight MASK_WEIGHT (0.3),
# --neither-weight MASK_NEITHER (5) with --neither-adversary and --structure-weight MASK_STRUCTURE (3), the flags of
# the bundled CPU mask models, with the cycle (and for beard_smile the translated-own) terms of their later CPU
# stages. MASK_GUIDE is smile_glasses_mask's --translated-guide-weight (default 0: the bundled CPU model added it at
# 10 only in its last stage, from a trained model, since the detached encoders it reads know nothing early on).
# NOISE and NEITHER are --common-noise and --neither-weight for every run (default 0: off; see
# docs/evaluation.md, why removal fails); NEITHER_ADV=1 adds --neither-adversary to every run (needs NEITHER > 0). The bundled plain checkpoints were all
# fine-tuned on a CPU with NOISE=0.3 NEITHER=1 NEITHER_ADV=1 (smile_glasses' and beard_smile's last stages with
# STRUCTURE=3).
set -u -o pipefail
OUT=${OUT:-runs/release}
MINUTES=${MINUTES:-5}
SIZE=${SIZE:-128}
ADV=${ADV:-0.02}
STRUCTURE=${STRUCTURE:-1}
NOISE=${NOISE:-0}
NEITHER=${NEITHER:-0}
NEITHER_ADV=${NEITHER_ADV:-0}
MASK_REMOVAL=${MASK_REMOVAL:-5}
MASK_ADV=${MASK_ADV:-0.12}
MASKED_REMOVAL=${MASKED_REMOVAL:-10}
LR=${LR:-0.0005}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
JUDGE_STEPS=${JUDGE_STEPS:-3000}
BENCH=${BENCH:-1}
HTTP=${HTTP:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

common=(--data synthetic --image-size "$SIZE" --width slim --steps 10000000 --max-minutes "$MINUTES" --lr "$LR" --device "$DEVICE"
        --structure-weight "$STRUCTURE" --common-noise "$NOISE" --neither-weight "$NEITHER"
        --save-dtype float16 --no-progress --log-every "${LOG_EVERY:-100}" --sample-every 2500 --checkpoint-every 2500)
[ "$NEITHER_ADV" = 1 ] && common+=(--neither-adversary)

run() {  # run NAME FLAGS...: one training in the background, its output in $OUT/NAME.log
    local name=$1; shift
    "$PY" -m training "${common[@]}" --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1 &
    echo "started $name (pid $!): $*"
}

date -u +"start %FT%TZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# the flags every mask model shares, after the common ones (so they win): those of the bundled CPU mask models
MASK_COMMON="--adv-weight $MASK_ADV --removal-weight $MASK_REMOVAL --masked-removal-weight $MASKED_REMOVAL --mask-weight ${MASK_WEIGHT:-0.3}"
MASK_COMMON+=" --neither-weight ${MASK_NEITHER:-5} --neither-adversary --structure-weight ${MASK_STRUCTURE:-3}"
declare -A FLAGS=(
    [smile_glasses]="--pair smile_glasses --adv-weight $ADV"
    [beard_smile]="--pair beard_smile --adv-weight $ADV"
    [beard_glasses]="--pair beard_glasses --adv-weight $ADV"
    # the mask models with the terms of their later CPU stages on from the start (docs/evaluation.md): the code
    # cycle of the translations that add the smile or the beard at weight 1, and for beard_smile the content's own
    # attribute charged on its translations
    [smile_glasses_mask]="--pair smile_glasses --variant mask $MASK_COMMON --cycle-weight-b 1 --translated-guide-weight ${MASK_GUIDE:-0}"
    [beard_smile_mask]="--pair beard_smile --variant mask $MASK_COMMON --cycle-weight-b 1 --translated-own-weight 10"
    [beard_glasses_mask]="--pair beard_glasses --variant mask $MASK_COMMON --cycle-weight-a 1 --cycle-weight-b 1"
    [ablation_no_zero]="--pair smile_glasses --adv-weight $ADV --zero-weight 0"
    [ablation_no_adv]="--pair smile_glasses --adv-weight 0"
    [ablation_neither]="--pair smile_glasses --adv-weight 0 --zero-weight 0"
    [published_adv]="--pair smile_glasses --adv-weight 0.001"
    # the recipe of the bundled smile_glasses fine-tune (docs/evaluation.md, why removal fails); the
    # run's own flags come after the common ones, so they win
    [noise_neither]="--pair smile_glasses --adv-weight $ADV --common-noise 0.3 --neither-weight 1 --neither-adversary"
)
RUNS=${RUNS:-smile_glasses beard_smile beard_glasses smile_glasses_mask beard_smile_mask beard_glasses_mask ablation_no_zero ablation_no_adv ablation_neither published_adv noise_neither}
for name in $RUNS; do
    # shellcheck disable=SC2086  # the flags are meant to split into words
    run "$name" ${FLAGS[$name]}
done
did() { "$PY" -m training.cli "$@"; }  # `did` without needing the console script installed

did judge train --device "$DEVICE" \
    --steps "$JUDGE_STEPS" --batch-size 128 --out "$OUT/judge/judge" --no-progress >"$OUT/judge.log" 2>&1 &
echo "started judge (pid $!)"

failed=0
for job in $(jobs -p); do wait "$job" || failed=$((failed + 1)); done
date -u +"training done %FT%TZ ($failed failed)"
for f in "$OUT"/*.log; do echo "== $f"; tail -n 3 "$f"; done
for d in "$OUT"/*/; do [ -f "$d/log.jsonl" ] && echo "$(basename "$d"): $(tail -n 1 "$d/log.jsonl")"; done

# PACK=DIR: checkpoints and logs in at most 6 files of under 16 MB (checkpoints of up to two runs per archive), and with
# eval.tar and benchmarks.md at most 8, for a copy off the machine.
if [ -n "${PACK:-}" ]; then
    mkdir -p "$PACK"
    (cd "$OUT" && tar cf "$PACK/meta.tar" --exclude='*.safetensors' --exclude='train_state.pt' --exclude=http_weights . )
    i=0
    for group in "smile_glasses smile_glasses_mask judge" "beard_smile beard_smile_mask" "beard_glasses beard_glasses_mask" \
                 "ablation_no_zero ablation_no_adv" "ablation_neither published_adv" noise_neither; do
        files=()
        for name in $group; do
            if [ "$name" = judge ]; then [ -d "$OUT/judge" ] && files+=(judge); else for f in "$OUT/$name"/model.*; do [ -f "$f" ] && files+=("$name/$(basename "$f")"); done; fi
        done
        i=$((i + 1))
        [ ${#files[@]} -gt 0 ] && (cd "$OUT" && tar cf "$PACK/ckpt_$i.tar" "${files[@]}")
    done
    ls -la "$PACK"
fi

# Evaluation of every run on the GPU (test seed 7919), figures for the shipped ones.
if [ "${EVAL:-1}" = 1 ] && [ -f "$OUT/judge/judge.json" ]; then
    for d in "$OUT"/*/; do
        name=$(basename "$d")
        [ -f "$d/model.json" ] || continue
        figs=(); case $name in smile_glasses|beard_smile|beard_glasses|*_mask) figs=(--figures "$OUT/figures/$name");; esac
        # A mask model beside the plain one of its pair, on the same faces: the mask paper's removal table.
        cmp=(); case $name in *_mask) [ -f "$OUT/${name%_mask}/model.json" ] && cmp=(--compare "$OUT/${name%_mask}");; esac
        timeout 240 "$PY" -m training.cli eval \
            --model "$d" --judge "$OUT/judge/judge" --n "${EVAL_N:-512}" --device "$DEVICE" --json "$OUT/eval/$name.json" \
            "${figs[@]}" "${cmp[@]}" >"$OUT/eval_$name.log" 2>&1 || echo "eval of $name failed: $(tail -n 2 "$OUT/eval_$name.log")"
    done
    date -u +"evaluation done %FT%TZ"
fi

if [ "$BENCH" = 1 ]; then
    "$PY" -m bench.training --steps 30 --configs paper:128:32 slim:128:32 2>&1 | tail -n 8
    [ -n "${PACK:-}" ] && cp docs/benchmarks.md "$PACK/benchmarks.md"
    "$PY" -m bench.inference --configs paper:128 slim:128 --batches 1 256 --seconds 1 2>&1 | tail -n 16
    [ -n "${PACK:-}" ] && cp docs/benchmarks.md "$PACK/benchmarks.md"
    if [ "$HTTP" = 1 ] && [ -f "$OUT/smile_glasses/model.json" ]; then
        did export "$OUT/smile_glasses" "$OUT/http_weights/smile_glasses"
        timeout 200 "$PY" -m bench.http_load --weights "$OUT/http_weights" --concurrency 1 16 64 --requests 3000 \
            --seconds 8 2>&1 | tail -n 12
    fi
fi
date -u +"end %FT%TZ"
if [ -n "${PACK:-}" ]; then
    (cd "$OUT" && tar cf "$PACK/eval.tar" eval figures ./*.log 2>/dev/null)
    cp docs/benchmarks.md "$PACK/benchmarks.md"
fi
