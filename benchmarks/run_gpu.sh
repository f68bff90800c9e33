#!/usr/bin/env bash
# The whole GPU measurement in one call, time-boxed to 8 minutes, or the same steps at toy sizes on the CPU
# (--cpu: the CI smoke run, tests/test_benchmarks.py).
#
#   bash benchmarks/run_gpu.sh --out DIR --commit SHA [--cpu]
#   bash benchmarks/run_gpu.sh --plan [--cpu]      # the steps and their budgets; runs nothing
#
# Steps, in this order (each under `timeout`; a failed or timed-out step is recorded and the next one still
# runs; after every step DIR/results.json and DIR/results.md are rewritten, so a cut-off run keeps what it
# measured): pytest -m gpu (all but the digits demo); the photo set; the FLOPs check; model-only ceilings
# (1x and 0.25x, batch 256 and 512: eager, channels_last, + bf16, + compile, + CUDA graphs, reduce-overhead);
# the DALI pipeline alone; end to end from JPEG (DALI at hw_decoder_load {0.65, 0.99} x threads {4, 8}, and
# the torchvision DataLoader with all cores); torch.profiler over 10 steps of the compiled 1x ceiling and of
# DALI end to end; train_ddp.py under torchrun with the trainer's defaults for 150 steps (stopped by SIGUSR1: the
# trainer's preemption path, so no final evaluation inside the time box); the gpu test that compiles and
# trains the digits demo (last: the longest test, so that it cannot starve the measurements); the chart.
# Budgets (--plan) add up to TOTAL_S exactly; a step may also use what earlier steps left unused, never what
# later steps are budgeted. DIR gets 6 files: results.json, results.md, log.txt, throughput.png,
# trace_ceiling.json.gz, trace_e2e_dali.json.gz. Exit code: 0 when every step passed.
#
# --commit SHA: the commit of the tree, recorded with every number (a copied tree has no .git to ask).
# Needs python3 with torch + torchvision (or $PYTHON), pytest, matplotlib for the chart, DALI importable.
# The repo is not installed: this script puts its root on PYTHONPATH.
#
# On the offline GPU host (../shared/device/README.md packs DALI 2.4.0 for it; an upload carries <= 64 MiB, the
# repo's own ~1 MiB included), from the repo's root on the development machine:
#   1. Once, here: the parts, and one folder per upload, so that nothing has to run here between the calls:
#        for d in /.dali-parts/ /.dali-00/ /.dali-01/ /.dali-02/ /.dali-03/; do
#          grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
#        bash ../shared/device/pack-dali.sh .dali-parts           # 4 parts of ~58 MiB + SHA256SUMS (~5 min)
#        for k in 00 01 02 03; do mkdir -p .dali-$k && cp .dali-parts/dali.tar.xz.part-$k .dali-parts/SHA256SUMS \
#          ../shared/device/unpack-dali.py ../shared/device/dali-smoke.py .dali-$k/; done
#   2. Commit, then four device calls back to back: an idle host is recycled within about half a minute, and
#      its /tmp (the parts received so far) with it. Call k = 00, 01, 02 carries [".dali-k"], command:
#          mkdir -p /tmp/dali-parts && mv .dali-k/* /tmp/dali-parts/ && python3 /tmp/dali-parts/unpack-dali.py
#      and ends with exit 3 ("k/4 parts ..."); if one lists a part as missing that was sent, the host was
#      recycled: start again at 00. The last call carries [".dali-03"], timeout_s=600 (~20 s unpack + the
#      480 s box + up to 10 s for a step killed at its limit):
#          mkdir -p /tmp/dali-parts && mv .dali-03/* /tmp/dali-parts/ && python3 /tmp/dali-parts/unpack-dali.py \
#          && export PYTHONPATH=/tmp/dali-site && PYTHONUNBUFFERED=1 bash benchmarks/run_gpu.sh --out $OUT \
#             --commit <git rev-parse HEAD of the tree sent>
#   3. Here: python benchmarks/collect_results.py --record <fetched folder>/results.md   (into RESULTS.md)
set -uo pipefail

OUT=""
CPU=0
PLAN=0
COMMIT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --commit) COMMIT="$2"; shift 2 ;;
    --commit=*) COMMIT="${1#--commit=}"; shift ;;
    --cpu) CPU=1; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument '$1' (expected --out DIR [--commit SHA] [--cpu] | --plan [--cpu])" >&2
       exit 2 ;;
  esac
done

# ------------------------------------------------------------------------------------------ the plan
# name:budget_s in run order; write_up is the time kept for the last results.md and the chart.
if [[ $CPU -eq 1 ]]; then
  MODE=cpu
  TOTAL_S=1200                         # generous: on 2 shared cores the budgets only catch hangs
  STEPS=(gpu_tests:90 dataset:60 flops:60 ceilings:240 pipeline:120 end_to_end:180 profile:120 ddp:120
         ddp_gloo_1:90 ddp_gloo_2:90 write_up:30)
else
  MODE=gpu
  TOTAL_S=480                          # 8 minutes: what the GPU host's device time leaves after DALI's uploads
  # Not yet measured on a GPU: correct them from a run's "Steps" table. gpu_tests starts five train_ddp.py
  # processes (each pays the interpreter, torch, CUDA and cuDNN start-up) besides its in-process tests; it
  # comes first and can borrow from nobody, so it gets the most room it may need. Compilation is most of the
  # ceilings' time (three compiled variants per width and batch); the batch-512 groups run last, the first to
  # be cut. The GPU test that compiles and trains the digits demo runs last (gpu_demo): it cannot starve the rest.
  STEPS=(gpu_tests:90 dataset:15 flops:10 ceilings:120 pipeline:20 end_to_end:75 profile:30 ddp:50 gpu_demo:60
         write_up:10)
fi
SUM=0
for s in "${STEPS[@]}"; do SUM=$((SUM + ${s#*:})); done
if (( SUM != TOTAL_S )); then
  echo "run_gpu.sh: the step budgets add up to ${SUM}s, not TOTAL_S=${TOTAL_S}s: fix the plan" >&2; exit 2
fi
if [[ $PLAN -eq 1 ]]; then
  printf '%s\n' "${STEPS[@]}"
  echo "total:$TOTAL_S"
  exit 0
fi
[[ -n "$OUT" ]] || { echo "run_gpu.sh: --out DIR is required" >&2; exit 2; }
TOTAL_S=${BENCH_TOTAL_S:-$TOTAL_S}      # tests shrink the time box to see steps cut

budget() { local s; for s in "${STEPS[@]}"; do [[ ${s%%:*} == "$1" ]] && { echo "${s#*:}"; return; }; done; echo 0; }
upto() {  # budgets of the steps up to and including $1
  local s sum=0
  for s in "${STEPS[@]}"; do
    sum=$((sum + ${s#*:}))
    [[ ${s%%:*} == "$1" ]] && break
  done
  echo "$sum"
}

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
T0=$(date +%s)

if [[ $MODE == cpu ]]; then
  # 64 photos: decode cost per image is what matters here, not the count
  NUM_TRAIN=64; NUM_VAL=16; CLASSES=8; BATCH=8
  # 128 px crops: the model's share of a CPU step shrinks 3x; the loaders still decode the full 500x375 JPEGs.
  # One torch thread: with other load on 2 cores, 2 OpenMP threads spin at barriers (measured 10x slower)
  TT=(--device cpu --threads 1 --batch-sizes 8 --image-size 128 --warmup 2 --windows 3 --window-s 0.2)
  CEIL=(--widths 0.25 --compile-backend aot_eager)   # inductor's C++ builds take minutes on 2 cores; the
                                                    # variants: all but the CUDA-graph ones, which need a GPU
  E2E=(--widths 0.25 --loader-threads "$NPROC")
  PIPE=(--device cpu --batch 8 --steps 2 --rounds 3 --warmup 1 --threads "$NPROC")
  PROF=(--device cpu --threads 1 --width 0.25 --batch 8 --image-size 128 --warmup 2 --steps 3)
  DDP_STEPS=2; DDP_EPOCH=3
  GPU_TESTS=()   # every gpu test in one pytest run: here they are all skipped (no CUDA), so order does not matter
  DDP=(--model 0.25x-FDMobileNet-224 optim.batch_size=8 train.steps_per_epoch=$DDP_EPOCH train.device=cpu
       data.crop_size=128 data.val_resize=146 data.val_crop=128 --print-freq 1)
else
  # 20000 train JPEGs (>= 20k: epochs of 78 batches, so the reader's shuffle and epoch ends behave as on
  # ImageNet), re-read from the page cache: decode and augmentation are measured, not disk reads. 1000
  # classes (20 images each) keep the ImageNet head, so the compiled graphs of the ceilings are reused from
  # inductor's cache by the end-to-end, profile and DDP steps.
  NUM_TRAIN=20000; NUM_VAL=1024; CLASSES=1000; BATCH=256
  TT=(--batch-sizes 256,512 --warmup 6 --windows 3 --window-s 0.4)   # warm-up > the graphed step's 3 + capture
  CEIL=(--widths 1,0.25)
  E2E=(--batch-sizes 256 --widths 1,0.25 --loader-threads "$NPROC" --dali-settings 0.65:4,0.65:8,0.99:4,0.99:8)
  PIPE=(--batch 256 --steps 20 --rounds 3 --warmup 3 --threads 8 --hw-decoder-load 0.99)
  PROF=(--width 1 --batch 256 --warmup 8 --steps 10)
  DDP_STEPS=150; DDP_EPOCH=$((NUM_TRAIN / 256))
  GPU_TESTS=(-k "not digits_demo")   # the digits demo compiles: it runs last, as gpu_demo
  DDP=(--model 1x-FDMobileNet-224 optim.batch_size=256 --print-freq 10)
fi
DATA="$BASE/photos-$NUM_TRAIN-$CLASSES"

{
  echo "run_gpu.sh mode=$MODE started $(date -u +%FT%TZ) on $(hostname), $NPROC cores, python: $PY," \
       "commit ${COMMIT:-(from git)}"
  echo "plan: ${STEPS[*]} = ${TOTAL_S}s; data set $DATA ($NUM_TRAIN train + $NUM_VAL val JPEGs, $CLASSES classes)"
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

collect() {
  "$PY" "$REPO/benchmarks/collect_results.py" --work "$WORK" --out "$OUT" --mode "$MODE" --data "$DATA" \
    --total-s "$TOTAL_S" "$@" >> "$LOG" 2>&1 || echo "collect_results.py failed (see log.txt)" >&2
}

FAILED=0
# step NAME COMMAND...: run under timeout until the budgets up to this step are spent (its own plus what earlier
# steps left unused; never past TOTAL_S), log, record, flush
step() {
  local name="$1"; shift
  local now elapsed limit rc status start cum
  now=$(date +%s); elapsed=$((now - T0)); cum=$(upto "$name")
  limit=$(( (cum < TOTAL_S ? cum : TOTAL_S) - elapsed ))
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
  printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %d, "budget_s": %d, "started_at_s": %d}\n' \
    "$name" "$status" "$rc" "$secs" "$(budget "$name")" "$((start - T0))" >> "$WORK/steps.jsonl"
  printf '[%4ds] %-20s %-8s %4ds (budget %ds)\n' "$(( $(date +%s) - T0 ))" "$name" "$status" "$secs" \
    "$(budget "$name")"
  collect
}

# ------------------------------------------------------------------------------------------- the steps
# --continue-on-collection-errors: a test module the host cannot import fails the step, but the gpu tests still run
step gpu_tests "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -v -p no:cacheprovider --continue-on-collection-errors tests
step dataset "$PY" -m pipelines.photo_set "$DATA" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --classes "$CLASSES"
step flops bash -c '"$0" benchmarks/flops_check.py --json > "$1"' "$PY" "$WORK/flops.json"
step ceilings "$PY" benchmarks/train_throughput.py "${TT[@]}" "${CEIL[@]}" --json "$WORK/ceilings.json"
step pipeline "$PY" benchmarks/pipeline_throughput.py --data "$DATA" "${PIPE[@]}" --json "$WORK/pipeline.json"
step end_to_end "$PY" benchmarks/train_throughput.py "${TT[@]}" "${E2E[@]}" --variants none \
  --loaders torchvision,dali --data-root "$DATA" --set "data.num_classes=$CLASSES" --json "$WORK/e2e.json"
step profile "$PY" benchmarks/profile_step.py "${PROF[@]}" --out "$OUT" --data-root "$DATA" \
  --set "data.num_classes=$CLASSES" --json "$WORK/profile.json"
# The trainer as a user starts it: its defaults (DALI with the auto loader settings, AMP + compile on CUDA),
# three epochs of which DDP_STEPS steps run before SIGUSR1 stops it. One rank: what one GPU of a DDP job runs.
step ddp "$PY" benchmarks/train_steps.py --steps "$DDP_STEPS" --steps-per-epoch "$DDP_EPOCH" --json "$WORK/ddp.json" \
  -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 train_ddp.py \
  --data imagenet-aggressive --optim SGD-120-nesterov --sched StepLR-30-0.1 --label ddp-bench --fresh \
  "${DDP[@]}" "data.root=$DATA" "data.num_classes=$CLASSES" "data.loader=$DDP_LOADER" optim.epochs=3 \
  train.eval_every=0 train.plot=false "train.output_dir=$WORK/ddp"
[[ $MODE == gpu ]] && step gpu_demo "$PY" -m pytest -m gpu -k digits_demo -v -p no:cacheprovider \
  --continue-on-collection-errors tests
if [[ $MODE == cpu ]]; then
  # DDP cost on gloo: the same per-rank step, 1 rank vs 2 ranks (1 thread each, so they do not share a core)
  for n in 1 2; do
    step "ddp_gloo_$n" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
      benchmarks/train_throughput.py --ddp --device cpu --threads 1 --widths 0.25 --batch-sizes 8 --image-size 128 \
      --variants channels_last --warmup 2 --windows 3 --window-s 0.3 --json "$WORK/ddp_gloo_$n.json"
  done
fi

collect --chart
# the GPU host returns files of at most 16 MiB: keep the log's end if it grew past that
if (( $(stat -c %s "$LOG") > 15000000 )); then tail -c 15000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"; fi
echo "run_gpu.sh: done in $(( $(date +%s) - T0 ))s; results in $OUT" | tee -a "$LOG"
cat "$OUT/results.md" 2>/dev/null
exit $FAILED
