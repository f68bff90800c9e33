#!/usr/bin/env bash
# The GPU measurement as one time box of at most 300 s, the headline numbers first, or the same steps at toy
# sizes on the CPU (--cpu: the CI smoke run, tests/test_benchmarks.py).
#
#   bash benchmarks/run_gpu.sh --out DIR --commit SHA [--cpu] [--from STEP | --only STEP,STEP...]
#   bash benchmarks/run_gpu.sh --plan [--cpu] [--from STEP | --only STEP,...]   # the steps; runs nothing
#
# Order (--plan prints it with each step's budget and what it measures): the hardware-decoder probe and the
# photo set with its manifests; then the headline rows - end to end from JPEG at 1x and 0.25x (batch 256) with
# DALI (hw_decoder_load 0.99, the auto threads) and the torchvision DataLoader, each beside the compiled
# ceiling of the same trainer (e2e / ceiling) with its data-wait share, and the model-only ceilings compiled
# and compiled + CUDA graphs - so that "end to end / ceiling" and "DALI / DataLoader" exist after about three
# minutes; then the pre-resized rows (stored shorter side x training resolution, the pipelines alone, on a
# small photo set and its pipelines.resize copies); then, each cut first when time runs short: the
# hw_decoder_load x threads sweep of DALI alone,
# batch 512, the eager / channels_last / bf16 / reduce-overhead variants, torch.profiler, train_ddp.py under
# torchrun, pytest -m gpu and the digits demo. A step may use what the steps before it left unused, never
# what the steps after it reserve; one that runs out is killed (timeout) and one with under 5 s left is
# skipped; the next still runs. To add a step: its name:budget in HEADLINE or REST (in order; the budgets
# add up to TOTAL_S), a line in describe(), a `step NAME command...` line below in the same order, and its
# JSON in collect_results.py.
#
# Rows: every row reaches DIR/results.json and DIR/results.md the moment it is measured - the step scripts
# rewrite their JSON after each row (train_throughput.py), round (pipeline_throughput.py), trace
# (profile_step.py) or log window (train_steps.py), and a watcher re-collects within a second of any change -
# so a box cut anywhere keeps everything measured before the cut.
# Compile once: every process shares one inductor cache (TORCHINDUCTOR_CACHE_DIR, with the FX-graph and
# AOTAutograd caches on; under BENCH_WORK, so a rerun on the same host reuses it); the benchmark scripts compile
# with dynamic=False and make dynamo's recompile limit an error (train_throughput.py); results.md reports graphs
# compiled, cache hits, graphs compiled inside timed windows and any step's "hit config.recompile_limit".
# DIR gets results.json, results.md, log.txt, throughput.png, stored_size.png, trace_ceiling.json.gz,
# trace_e2e_dali.json.gz.
# Exit code: 0 when every step that ran passed. --commit SHA: the commit of the tree, recorded with every
# number (a copied tree has no .git to ask). Needs python3 with torch + torchvision (or $PYTHON), pytest,
# matplotlib for the chart, DALI importable. The repo is not installed: this script puts its root on PYTHONPATH.
#
# ----------------------------------------------------------------------------- the device procedure
# One GPU host, offline, 15 minutes of device time for everything (each start, transfer, command and idle
# minute counts); an upload carries <= 64 MiB, the repo's own ~0.9 MiB included; an idle host is recycled
# after a short while, and its /tmp with it. From the repo's root here:
#   0. Once: bash benchmarks/pack_dali.sh .dali -> one upload folder per part, .dali/00, .dali/01, ... (N of
#      them; CUDA=12, the default and the build measured on the host: 4 parts of ~50 MiB; CUDA=13: 3 parts of
#      ~42 MiB, not yet run on the host; benchmarks/RESULTS.md, "DALI pack"). .dali/ is git-ignored.
#      Commit; SHA = git rev-parse HEAD.
#   1. Each folder but the last, one call right after the other: run carry=[".dali/NN"] timeout_s=60,
#        mkdir -p /tmp/dali-parts && mv .dali/NN/* /tmp/dali-parts/ && python3 benchmarks/unpack_dali.py
#      Each ends with exit 3 and "k/N parts ...". If one lists as missing a part that was sent, the host was
#      recycled between the calls: start again with .dali/00.
#   2. The last folder, at once: carry=[".dali/NN"] timeout_s=420 (unpack <= 30 s, the environment record
#      before the box ~15 s, the 300 s box, 10 s for a step killed at its limit, margin):
#        mkdir -p /tmp/dali-parts && mv .dali/NN/* /tmp/dali-parts/ && python3 benchmarks/unpack_dali.py \
#        && export PYTHONPATH=/tmp/dali-site && PYTHONUNBUFFERED=1 bash benchmarks/run_gpu.sh --out $OUT --commit SHA
#      (The four-part kit of ../shared/device unpacks the same way, with its own unpack-dali.py.)
#   3. The rerun, only when the box's last line says "rerun: --from STEP" and `status` leaves >= 7 min:
#      at once (the host and its /tmp/dali-site must still be there), no carry, timeout_s=360:
#        export PYTHONPATH=/tmp/dali-site && PYTHONUNBUFFERED=1 bash benchmarks/run_gpu.sh --out $OUT --commit SHA \
#          --from STEP
#      It repeats STEP (the first step cut or failed) and runs every step after it, with the whole box for
#      them; the photo set is rebuilt only when missing, and the first box's inductor cache is reused. If it
#      prints "DALI is not importable" the host was recycled: its DALI rows fail, the others still run.
#   4. give_back, at once.
#   A refused call ("already running", or no machine now) sent nothing: wait as `status` says and repeat the
#   same call. A failed start costs 1-2 min. Before the first call `status` must leave >= 10 min (start,
#   uploads, the box), else do not start.
#   5. Here, for each box: python benchmarks/collect_results.py --record <files_at>/results.md (RESULTS.md).
set -uo pipefail

OUT=""
CPU=0
PLAN=0
COMMIT=""
FROM=""
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --commit) COMMIT="$2"; shift 2 ;;
    --commit=*) COMMIT="${1#--commit=}"; shift ;;
    --from) FROM="$2"; shift 2 ;;
    --from=*) FROM="${1#--from=}"; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#--only=}"; shift ;;
    --cpu) CPU=1; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) sed -n '2,62p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument '$1' (expected --out DIR [--commit SHA] [--cpu] [--from STEP |" \
            "--only STEP,...] | --plan [--cpu])" >&2
       exit 2 ;;
  esac
done

# ------------------------------------------------------------------------------------------ the plan
# name:budget_s in run order; write_up is the time kept for the chart and the last results.md.
if [[ $CPU -eq 1 ]]; then
  MODE=cpu
  TOTAL_S=1200                         # generous: on 2 shared cores the budgets only catch hangs
  # No batch_512 or variants step: the ceilings step runs the eager variants beside the compiled one (a CPU
  # has no CUDA-graph variants to lead with), and a second batch size's static graph is test_trainer.py's.
  HEADLINE=(hw_decoder:60 dataset:60 end_to_end:150 ceilings:180)
  REST=(stored_size:60 dali_sweep:90 profile:120 ddp:120 gpu_tests:120 ddp_gloo_1:90 ddp_gloo_2:90)
  WRITE_UP=write_up:60
else
  MODE=gpu
  TOTAL_S=300
  # Estimates, not yet measured on a GPU: correct them from a box's "Steps" table. The first box on a host
  # compiles cold (tens of seconds per width); later steps and a rerun hit the inductor cache.
  HEADLINE=(hw_decoder:10 dataset:20 end_to_end:115 ceilings:35)
  # The pre-resized rows first of REST: they answer the decode-bound question right after the headline.
  REST=(stored_size:30 dali_sweep:15 batch_512:15 variants:15 profile:15 ddp:10 gpu_tests:10 gpu_demo:5)
  WRITE_UP=write_up:5
fi
STEPS=("${HEADLINE[@]}" "${REST[@]}" "$WRITE_UP")
NEEDS_DATA=" end_to_end dali_sweep profile ddp "   # steps that read the photo set

describe() {
  local gpu=$(( 1 - CPU ))
  case "$1" in
    hw_decoder) echo "nvJPEG: is the hardware JPEG decoder usable (nvjpegCreateEx HARDWARE, GetHardwareDecoderInfo)" ;;
    dataset) echo "photo set ($NUM_TRAIN + $NUM_VAL JPEGs 500x375 q90, $CLASSES classes) + manifests" ;;
    end_to_end) echo "headline: end to end, widths $E2E_WIDTHS, batch $BATCH: the trainer's ceiling, DataLoader, DALI$(
                 (( gpu )) && echo ' hw 0.99 auto threads + NVML JPEG engines')" ;;
    ceilings) echo "headline: model only, widths $E2E_WIDTHS, batch $BATCH: $(
               (( gpu )) && echo 'compiled vs compiled + CUDA graphs' ||
               echo 'eager fp32 NCHW, channels_last, + bf16, compiled (aot_eager)')" ;;
    stored_size) echo "pre-resized: $( (( gpu )) && echo 'DALI (GPU decode)' || echo 'DataLoader and DALI') alone," \
                      "stored shorter side {$STORED} x res {$STORED_RES}" ;;
    dali_sweep) echo "data pipeline alone: DataLoader vs DALI$(
                 (( gpu )) && echo ' hw_decoder_load {0, 0.65, 0.99} x threads {4, 8}')" ;;
    batch_512) echo "model only, batch $BIG_BATCH, compiled (static shapes)" ;;
    variants) echo "model only, batch $BATCH: eager fp32 NCHW, channels_last, + bf16$(
               (( gpu )) && echo ', reduce-overhead')" ;;
    profile) echo "torch.profiler: the trainer's ceiling and DALI end to end (traces)" ;;
    ddp) echo "train_ddp.py under torchrun, 1 rank, the trainer's defaults, $DDP_STEPS steps (SIGUSR1 stop)" ;;
    gpu_tests) echo "pytest -m gpu$( (( gpu )) && echo ' (all but the digits demo)')" ;;
    gpu_demo) echo "pytest -m gpu -k digits_demo (compiles and trains the demo)" ;;
    ddp_gloo_*) echo "gloo DDP cost: ${1#ddp_gloo_} rank(s), same per-rank batch" ;;
    write_up) echo "the chart and the last results.md" ;;
  esac
}

if [[ $MODE == cpu ]]; then
  # 64 photos: decode cost per image is what matters here, not the count
  NUM_TRAIN=64; NUM_VAL=16; CLASSES=8; BATCH=8; E2E_WIDTHS=0.25
  # 128 px crops: the model's share of a CPU step shrinks 3x; the loaders still decode the full 500x375 JPEGs.
  # One torch thread: with other load on 2 cores, 2 OpenMP threads spin at barriers (measured 10x slower)
  TT=(--device cpu --threads 1 --image-size 128 --warmup 2 --windows 3 --window-s 0.2 --widths "$E2E_WIDTHS")
  E2E=(--batch-sizes "$BATCH" --loaders torchvision,dali)
  # inductor's C++ builds take minutes on 2 cores: aot_eager; the CUDA-graph variants need a GPU
  CEIL=(--batch-sizes "$BATCH" --variants eager_fp32_nchw,channels_last,channels_last_bf16,compiled
        --compile-backend aot_eager)
  BIG=(); VARIANTS=()   # steps of the GPU plan only
  STORED=original,160; STORED_RES=128
  SIZES=(--quick --device cpu)
  PIPE=(--device cpu --batch 8 --steps 2 --rounds 3 --warmup 1 --threads "$(nproc)")
  PROF=(--device cpu --threads 1 --width 0.25 --batch 8 --image-size 128 --warmup 2 --steps 3)
  DDP_STEPS=2; DDP_EPOCH=3
  GPU_TESTS=()   # every gpu test in one pytest run: here they are all skipped (no CUDA), so order does not matter
  DDP=(--model 0.25x-FDMobileNet-224 optim.batch_size=8 train.steps_per_epoch=$DDP_EPOCH train.device=cpu
       data.crop_size=128 data.val_resize=146 data.val_crop=128 --print-freq 1)
else
  # 20000 train JPEGs (>= 20k: epochs of 78 batches, so the reader's shuffle and epoch ends behave as on
  # ImageNet), re-read from the page cache: decode and augmentation are measured, not disk reads. 1000
  # classes (20 images each) keep the ImageNet head, so the graphs compiled by the end-to-end step are the
  # ceilings', profile's and train_ddp.py's too (inductor's cache).
  NUM_TRAIN=20000; NUM_VAL=1024; CLASSES=1000; BATCH=256; BIG_BATCH=512; E2E_WIDTHS=1,0.25
  TT=(--warmup 6 --windows 3 --window-s 0.4 --widths "$E2E_WIDTHS")   # warm-up > the graphed step's 3 + capture
  E2E=(--batch-sizes "$BATCH" --loaders torchvision,dali --dali-settings 0.99:auto)
  CEIL=(--batch-sizes "$BATCH" --variants compiled,compiled_cuda_graphs)
  BIG=(--batch-sizes "$BIG_BATCH" --variants compiled)
  VARIANTS=(--batch-sizes "$BATCH" --variants eager_fp32_nchw,channels_last,channels_last_bf16,reduce_overhead)
  # 2560 photos (10 batches) and two resized copies (about 10 s of resizing on 16 cores); DALI only: the
  # DataLoader's CPU decode is the end-to-end step's, and 6 DataLoaders of 16 workers would not fit 30 s
  STORED=original,256,160; STORED_RES=224,160
  SIZES=(--device cuda --loaders dali --stored "$STORED" --res "$STORED_RES" --num-images 2560 --batch 256
         --steps 8 --warmup 3)
  PIPE=(--batch 256 --steps 12 --rounds 3 --warmup 3 --threads 4 8 --hw-decoder-load 0 0.65 0.99)
  PROF=(--width 1 --batch 256 --warmup 8 --steps 10)
  DDP_STEPS=150; DDP_EPOCH=$((NUM_TRAIN / 256))
  GPU_TESTS=(-k "not digits_demo")   # the digits demo compiles: it runs last, as gpu_demo
  DDP=(--model 1x-FDMobileNet-224 optim.batch_size=256 --print-freq 10)
fi

SUM=0
NAMES=()
for s in "${STEPS[@]}"; do SUM=$((SUM + ${s#*:})); NAMES+=("${s%%:*}"); done
if (( SUM != TOTAL_S )); then
  echo "run_gpu.sh: the step budgets add up to ${SUM}s, not TOTAL_S=${TOTAL_S}s: fix the plan" >&2; exit 2
fi
budget() { local s; for s in "${STEPS[@]}"; do [[ ${s%%:*} == "$1" ]] && { echo "${s#*:}"; return; }; done; echo 0; }

# The steps this box runs: all of them, those from --from on, or --only's (in plan order); the photo set
# whenever a step reads it.
if [[ -n $FROM && -n $ONLY ]]; then echo "run_gpu.sh: --from or --only, not both" >&2; exit 2; fi
for name in ${FROM} ${ONLY//,/ }; do
  if [[ " ${NAMES[*]} " != *" $name "* || $name == write_up ]]; then
    echo "run_gpu.sh: no step '$name' in the $MODE plan (steps: ${NAMES[*]/write_up/})" >&2; exit 2
  fi
done
SELECTED=()
reached=0
for name in "${NAMES[@]}"; do
  [[ $name == write_up ]] && continue
  [[ $name == "$FROM" ]] && reached=1
  if [[ -z $FROM && -z $ONLY ]] || (( reached )) || [[ ",$ONLY," == *",$name,"* ]]; then SELECTED+=("$name"); fi
done
if [[ -n $FROM || -n $ONLY ]] && [[ " ${SELECTED[*]} " != *" dataset "* ]]; then
  for name in "${SELECTED[@]}"; do
    if [[ $NEEDS_DATA == *" $name "* ]]; then SELECTED=(dataset "${SELECTED[@]}"); break; fi
  done
fi
PLAN_TOTAL_S=$TOTAL_S
# reserved(NAME): what the selected steps after NAME, and the write-up, are budgeted (in proportion when
# BENCH_TOTAL_S shrinks the box)
reserved() {
  local name after=0 sum=0
  for name in "${SELECTED[@]}"; do
    (( after )) && sum=$((sum + $(budget "$name")))
    [[ $name == "$1" ]] && after=1
  done
  echo $(( (sum + $(budget write_up)) * TOTAL_S / PLAN_TOTAL_S ))
}

if [[ $PLAN -eq 1 ]]; then
  echo "run_gpu.sh --plan ($MODE): one box of ${TOTAL_S} s, the steps in this order; a step may use what the"
  echo "steps before it left, never what the steps after it reserve ('by s': where the budgets alone end it)"
  printf '%-12s %8s %6s  %s\n' step budget_s by_s measures
  by=0
  for name in "${SELECTED[@]}" write_up; do
    by=$((by + $(budget "$name")))
    printf '%-12s %8d %6d  %s\n' "$name" "$(budget "$name")" "$by" "$(describe "$name")"
  done
  printf '%-12s %8d\n' total "$TOTAL_S"
  if (( by < TOTAL_S )); then
    echo "this box runs ${#SELECTED[@]} of the plan's steps: together they may also use the $((TOTAL_S - by)) s" \
         "the others are budgeted"
  fi
  exit 0
fi
[[ -n "$OUT" ]] || { echo "run_gpu.sh: --out DIR is required" >&2; exit 2; }
TOTAL_S=${BENCH_TOTAL_S:-$TOTAL_S}      # tests shrink the time box to see steps cut

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[[ -n "$COMMIT" ]] && export FDM_GIT_COMMIT="$COMMIT"
PY="${PYTHON:-python3}"
if [[ -z "${PYTHON:-}" && -x "$REPO/.venv/bin/python" ]] && ! python3 -c 'import torch' 2>/dev/null; then
  PY="$REPO/.venv/bin/python"   # a dev checkout: the project's venv
fi
NPROC=$(nproc)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BASE="${BENCH_WORK:-${TMPDIR:-/tmp}/fdm-bench}"
mkdir -p "$BASE"
WORK="$(mktemp -d "$BASE/run.XXXXXX")"
LOG="$OUT/log.txt"
: > "$LOG"
DATA="$BASE/photos-$NUM_TRAIN-$CLASSES"
# compile once: one inductor cache (FX graphs, AOTAutograd, Triton kernels) for every process of the box
export TORCHINDUCTOR_CACHE_DIR="$BASE/inductor-cache" TRITON_CACHE_DIR="$BASE/inductor-cache/triton"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1

{
  echo "run_gpu.sh mode=$MODE started $(date -u +%FT%TZ) on $(hostname), $NPROC cores, python: $PY," \
       "commit ${COMMIT:-(from git)}"
  echo "plan: ${STEPS[*]} = ${TOTAL_S}s; this box: ${SELECTED[*]}; data set $DATA ($NUM_TRAIN train +" \
       "$NUM_VAL val JPEGs, $CLASSES classes); inductor cache $TORCHINDUCTOR_CACHE_DIR"
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
             "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' 2>&1
} >> "$LOG"
if "$PY" -c 'import nvidia.dali as d; print("DALI", d.__version__)' >> "$LOG" 2>&1; then
  DDP_LOADER=dali
else
  DDP_LOADER=synthetic   # the DALI rows fail and say so; the DDP run still measures the trainer
  echo "DALI is not importable: the end-to-end/pipeline/profile DALI rows will fail; the DDP step uses" \
       "data.loader=synthetic" | tee -a "$LOG"
fi
# the box starts here: the record above (nvidia-smi, the first torch and DALI imports, a few seconds on a
# cold host) must not take the first step's budget
T0=$(date +%s)

collect() {
  "$PY" "$REPO/benchmarks/collect_results.py" --work "$WORK" --out "$OUT" --mode "$MODE" --data "$DATA" \
    --total-s "$TOTAL_S" --steps "${SELECTED[*]}" "$@" >> "$LOG" 2>&1 ||
    echo "collect_results.py failed (see log.txt)" >&2
}
# Rows as they are measured: re-collect within a second of any change of a step's JSON, the steps list or the
# gpu tests' output (the only files collect_results.py reads while the box runs).
watch_rows() {
  local seen="" now
  while kill -0 "$$" 2>/dev/null; do   # ends with the box, however the box ends
    now=$(stat -c '%n %i %s %Y' "$WORK"/*.json "$WORK"/steps.jsonl "$WORK"/gpu_*.log 2>/dev/null)
    if [[ $now != "$seen" ]]; then seen=$now; collect; fi
    sleep 1
  done
}
collect
watch_rows &
WATCHER=$!
trap 'kill $WATCHER 2>/dev/null' EXIT

FAILED=0
# step NAME COMMAND...: run NAME under timeout with what the box has left but the selected later steps'
# budgets and the write-up's; log it and add it to steps.jsonl (which the watcher collects)
step() {
  local name="$1"; shift
  [[ " ${SELECTED[*]} " == *" $name "* ]] || return 0
  local now elapsed limit rc status start
  now=$(date +%s); elapsed=$((now - T0))
  limit=$(( TOTAL_S - elapsed - $(reserved "$name") ))
  if (( limit < 5 )); then
    status=skipped; rc=-1; start=$now
    echo "== $name: skipped, $((TOTAL_S - elapsed))s left of ${TOTAL_S}s" | tee -a "$LOG"
  else
    echo "== $name (limit ${limit}s, at ${elapsed}s): $*" >> "$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    cat "$WORK/$name.log" >> "$LOG"
    if [[ $rc -eq 0 ]]; then status=ok
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout
    else status=failed; fi
  fi
  local secs=$(( $(date +%s) - start ))
  [[ $status == ok ]] || FAILED=1
  # one write per line: the watcher may read the file at any moment
  local line='{"name": "%s", "status": "%s", "rc": %d, "seconds": %d, "budget_s": %d, "limit_s": %d, "started_at_s": %d}'
  printf "$line\n" "$name" "$status" "$rc" "$secs" "$(budget "$name")" "$(( limit > 0 ? limit : 0 ))" \
    "$((start - T0))" >> "$WORK/steps.jsonl"
  printf '[%4ds] %-12s %-8s %4ds (budget %ds)\n' "$(( $(date +%s) - T0 ))" "$name" "$status" "$secs" \
    "$(budget "$name")"
}

# ------------------------------------------------------------------------------------------- the steps
# as a file, not -m: the pipelines package imports torch, which the probe does without
step hw_decoder "$PY" pipelines/hw_decoder.py --json "$WORK/hw_decoder.json"
# the manifests make every later loader's pre-flight a size/mtime comparison instead of reading every file
step dataset bash -c '"$0" -m pipelines.photo_set "$1" --num-train "$2" --num-val "$3" --classes "$4" &&
  if [[ -f $1/train/.manifest.tsv && -f $1/val/.manifest.tsv ]]; then echo "manifests: already written"
  else "$0" -m pipelines.verify "$1" --manifest; fi' "$PY" "$DATA" "$NUM_TRAIN" "$NUM_VAL" "$CLASSES"
step end_to_end "$PY" benchmarks/train_throughput.py "${TT[@]}" "${E2E[@]}" --variants none \
  --data-root "$DATA" --set "data.num_classes=$CLASSES" --json "$WORK/end_to_end.json"
step ceilings "$PY" benchmarks/train_throughput.py "${TT[@]}" "${CEIL[@]}" --json "$WORK/ceilings.json"
# its json reaches results.json (the watcher); its chart comes back beside throughput.png
step stored_size bash -c '"$0" benchmarks/stored_size.py "${@:3}" --rounds 3 --no-e2e --out "$1/stored_size" \
  --json "$1/stored_size.json" && cp "$1/stored_size/stored_size.png" "$2/"' "$PY" "$WORK" "$OUT" "${SIZES[@]}"
step dali_sweep "$PY" benchmarks/pipeline_throughput.py --data "$DATA" "${PIPE[@]}" --json "$WORK/dali_sweep.json"
step batch_512 "$PY" benchmarks/train_throughput.py "${TT[@]}" "${BIG[@]}" --json "$WORK/batch_512.json"
step variants "$PY" benchmarks/train_throughput.py "${TT[@]}" "${VARIANTS[@]}" --json "$WORK/variants.json"
step profile "$PY" benchmarks/profile_step.py "${PROF[@]}" --out "$OUT" --data-root "$DATA" \
  --set "data.num_classes=$CLASSES" --json "$WORK/profile.json"
# The trainer as a user starts it: its defaults (DALI with the auto loader settings, AMP + compile on CUDA),
# three epochs of which DDP_STEPS steps run before SIGUSR1 stops it. One rank: what one GPU of a DDP job runs.
step ddp "$PY" benchmarks/train_steps.py --steps "$DDP_STEPS" --steps-per-epoch "$DDP_EPOCH" --json "$WORK/ddp.json" \
  -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train_ddp.py \
  --data imagenet-aggressive --optim SGD-120-nesterov --sched StepLR-30-0.1 --label ddp-bench --fresh \
  "${DDP[@]}" "data.root=$DATA" "data.num_classes=$CLASSES" "data.loader=$DDP_LOADER" optim.epochs=3 \
  train.eval_every=0 train.plot=false "train.output_dir=$WORK/ddp"
# --continue-on-collection-errors: a test module the host cannot import fails the step, but the gpu tests still run
step gpu_tests "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -v -p no:cacheprovider --continue-on-collection-errors tests
step gpu_demo "$PY" -m pytest -m gpu -k digits_demo -v -p no:cacheprovider --continue-on-collection-errors tests
# DDP cost on gloo (CPU): the same per-rank step, 1 rank vs 2 ranks (1 thread each, so they do not share a core)
for n in 1 2; do
  step "ddp_gloo_$n" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
    benchmarks/train_throughput.py --ddp --device cpu --threads 1 --widths 0.25 --batch-sizes 8 --image-size 128 \
    --variants channels_last --warmup 2 --windows 3 --window-s 0.3 --json "$WORK/ddp_gloo_$n.json"
done

kill "$WATCHER" 2>/dev/null
wait "$WATCHER" 2>/dev/null
collect --chart
# the GPU host returns files of at most 16 MiB: keep the log's end if it grew past that
if (( $(stat -c %s "$LOG") > 15000000 )); then tail -c 15000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"; fi
echo "run_gpu.sh: done in $(( $(date +%s) - T0 ))s; results in $OUT" | tee -a "$LOG"
cat "$OUT/results.md" 2>/dev/null
rerun=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("rerun_from") or "")' "$OUT/results.json" \
        2>/dev/null)
[[ -n $rerun ]] && echo "rerun: --from $rerun   (steps cut or failed from there on; run_gpu.sh's header, step 4)"
exit $FAILED
