#!/usr/bin/env bash
# One GPU, one command: trains the recipes of the shipped checkpoints (training/recipes/) at SIZE px, the loss
# ablation of smile_glasses (its recipe with one term's weight set to 0) and the judge, all at once on the one GPU
# (each training a separate process), evaluates every run, then runs the GPU benchmarks on the idle GPU
# (bench/gpu.sh, whose benchmarks write their tables into docs/benchmarks.md: --write). Every run
# writes into $OUT/<name>/ (plan.json, stages/, the final model.json + model.safetensors).
#
#   OUT=runs/release STAGE_STEPS=1500 MINUTES=8 bash bench/release_gpu.sh
#
# STAGE_STEPS runs every stage of every recipe for that many steps (`did train --stage-steps`; empty: the recipes'
# own steps). MINUTES stops every training after that long (`--max-minutes`); a run stopped before its last stage
# writes no final checkpoint, and the same command continues it. RUNS picks the trainings (default: all nine).
# EVAL=0 skips the evaluation, BENCH=0 the benchmarks, HTTP=0 the HTTP one. PACK=DIR puts everything into a few tar
# files there.
set -u -o pipefail
OUT=${OUT:-runs/release}
MINUTES=${MINUTES:-0}
SIZE=${SIZE:-128}
STAGE_STEPS=${STAGE_STEPS:-}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
JUDGE_STEPS=${JUDGE_STEPS:-3000}
BENCH=${BENCH:-1}
HTTP=${HTTP:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

common=(--set "image_size=$SIZE" --max-minutes "$MINUTES" --device "$DEVICE" --no-progress
        --log-every "${LOG_EVERY:-100}" --sample-every 2500 --checkpoint-every 2500)
[ -n "$STAGE_STEPS" ] && common+=(--stage-steps "$STAGE_STEPS")

run() {  # run NAME RECIPE FLAGS...: one training in the background, its output in $OUT/NAME.log
    local name=$1 recipe=$2; shift 2
    "$PY" -m training --recipe "$recipe" "${common[@]}" --out "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1 &
    echo "started $name (pid $!): --recipe $recipe $*"
}

date -u +"start %FT%TZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
declare -A FLAGS=(
    [smile_glasses]="smile_glasses" [beard_smile]="beard_smile" [beard_glasses]="beard_glasses"
    [smile_glasses_mask]="smile_glasses_mask" [beard_smile_mask]="beard_smile_mask" [beard_glasses_mask]="beard_glasses_mask"
    # the ablation: the plain recipe without the zero loss, without the adversary, without both
    [ablation_no_zero]="smile_glasses --weight zero=0"
    [ablation_no_adv]="smile_glasses --weight adversarial=0 --weight neither_adversarial=0"
    [ablation_neither]="smile_glasses --weight zero=0 --weight adversarial=0 --weight neither_adversarial=0"
)
RUNS=${RUNS:-smile_glasses beard_smile beard_glasses smile_glasses_mask beard_smile_mask beard_glasses_mask ablation_no_zero ablation_no_adv ablation_neither}
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
                 "ablation_no_zero ablation_no_adv" ablation_neither; do
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

[ "$BENCH" = 1 ] && PY=$PY HTTP=$HTTP DEVICE=$DEVICE bash bench/gpu.sh
date -u +"end %FT%TZ"
if [ -n "${PACK:-}" ]; then
    (cd "$OUT" && tar cf "$PACK/eval.tar" eval figures ./*.log 2>/dev/null)
    cp docs/benchmarks.md "$PACK/benchmarks.md"
fi
