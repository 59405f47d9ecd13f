#!/usr/bin/env bash
# One GPU check in one call: install carried wheels, stage megasyne, run the benchmarks.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA box (python3 with torch + triton)
#   OUT=/tmp/gout DRY=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU rehearsal
#
# Made for a bare GPU machine that has torch, triton, transformers and pybind11 but not
# megatron-core: wheels in $WHL_DIR (default .whl/: megatron-core 0.16.1, liger-kernel) are
# installed with --no-deps into $SITE and put on PYTHONPATH. megasyne is staged into
# /tmp/msy as an importable tree (megasyne/ + kernels/ as megasyne.kernels), so no build
# is needed for the benchmarks; the C++ extension (csrc/) is compiled last, as a check.
#
# Steps, in order of value; each is time-limited, a failing step is reported (rc) and the
# next one still runs; all JSON and the whole log land in $OUT:
#   1. bench_train_gpu.py: TinyLlama-1.1B, seq 2048, mbs 4, kernels on/off vs HF  -> bench_train.json
#   2. bench_kernels.py, short: 16384 tokens, CE vocab whole and split 4, RoPE, SwiGLU, and the
#      RMSNorm launch tuner's choices                                              -> bench_kernels.json
#   3. bench_train_gpu.py at 4 micro-batches of 4 per step (gradient accumulation, the way a
#      CPT run trains; same for HF), if time is left                              -> bench_train_ga4.json
#   3b. the same tokens per step as 2 micro-batches of 8 (larger GEMMs)          -> bench_train_mbs8_ga2.json
#   4. python setup.py build_ext (csrc/) in a copy, then import megasyne._csrc
# PLAN=trainer (a second call): tiny_job (the trainer on CUDA), prefetch_ab (step time with data
# prefetch on vs off, reads as they are and 20 ms slower), bench_train, bench_train_mbs8.
set -u -o pipefail

OUT=${OUT:-$PWD/gpu_out}
PY=${PY:-python3}
WHL_DIR=${WHL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
STAGE=${STAGE:-/tmp/msy}
DRY=${DRY:-0}                  # 1: CPU rehearsal (benchmarks with --dry-run)
BUDGET_S=${BUDGET_S:-420}      # stop starting optional steps after this many seconds
SKIP=${SKIP:-}                 # step names to skip, e.g. SKIP="bench_kernels build_csrc"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$PWD
T0=$SECONDS
STATUS=""

elapsed() { echo $((SECONDS - T0)); }

# step NAME TIMEOUT_S CMD...: run, time-limited, and record NAME=rc (124 = timed out).
step() {
  local name=$1 limit=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "=== skip $name (SKIP)"; STATUS="$STATUS $name=skipped"; return 0;; esac
  echo
  echo "=== [$(elapsed)s] BEGIN $name (limit ${limit}s): $*"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  local rc=$?
  [ $rc -eq 124 ] && echo "!!! $name TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && echo "!!! $name FAILED rc=$rc"
  echo "=== [$(elapsed)s] END $name rc=$rc"
  STATUS="$STATUS $name=$rc"
  return 0
}

install_wheels() {
  shopt -s nullglob
  local wheels=("$WHL_DIR"/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in $WHL_DIR: using what is installed"
    return 0
  fi
  printf '  %s\n' "${wheels[@]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
}

stage_megasyne() {
  rm -rf "$STAGE" && mkdir -p "$STAGE" || return 1
  cp -r "$REPO/megasyne" "$STAGE/" || return 1
  rm -rf "$STAGE/megasyne/kernels" "$STAGE"/megasyne/_csrc*.so
  cp -r "$REPO/kernels" "$STAGE/megasyne/kernels" || return 1
  find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
  echo "staged megasyne in $STAGE"
}

versions() {
  # From /tmp so that the checkout's megasyne/ (no kernels/ inside) cannot shadow the stage.
  (cd /tmp && "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "tokenizers", "safetensors", "megatron.core", "liger_kernel", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import megasyne, megasyne.kernels
from megasyne.model import accel
print("megasyne", megasyne.__file__, "| kernels", megasyne.kernels.__file__)
print("path:", accel.describe())
EOF
  )
}

build_csrc() {
  local dir=/tmp/msbuild
  rm -rf "$dir" && mkdir -p "$dir" || return 1
  cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/csrc" "$REPO/megasyne" "$REPO/kernels" "$dir/" || return 1
  rm -f "$dir"/megasyne/_csrc*.so
  (cd "$dir" && "$PY" setup.py -q build_ext --inplace -j 8) || return 1
  (cd "$dir" && "$PY" -c "from megasyne import _csrc; print('megasyne._csrc', _csrc.__file__, _csrc.INDEX_ALGO_VERSION)")
}

# The trainer itself on CUDA (NCCL, Triton kernels, fused AdamW): the README's tiny job on one
# GPU, preprocess -> index -> train to step 20 -> checkpoint -> resume -> step 40.
tiny_job() {
  cd "$REPO" || return 1
  [ -e megasyne/kernels ] || ln -s ../kernels megasyne/kernels   # package_dir, as pip would map it
  "$PY" setup.py -q build_ext --inplace -j 8 >/dev/null || return 1
  PYTHONPATH="$REPO:$SITE" "$PY" examples/tiny/run_tiny.py --nproc 1 --set parallel.tp=1 dtype=bf16 \
    || return 1
  tail -n 3 runs/tiny/metrics.jsonl | cut -c1-400
  cp runs/tiny/metrics.jsonl "$OUT/tiny_metrics.jsonl"; cp runs/tiny/loss.png "$OUT/tiny_loss.png" 2>/dev/null
  return 0
}

# Data prefetch on vs off on one GPU (after tiny_job: its tokenised data exist): the tiny
# model's 40 steps, reading as they are and with 20 ms of simulated storage latency per read
# (the testing hook fault_data_read_delay_s); mean step time and data wait per variant, from
# metrics.jsonl without the first 3 steps (warm-up). Also: pin_memory() of a pinned tensor is
# the same memory (the prefetcher pins, the upload calls pin_memory() again).
prefetch_ab() {
  cd "$REPO" || return 1
  local rc=0 delay depth run
  "$PY" -c "import torch; t = torch.ones(4).pin_memory(); \
assert t.pin_memory().data_ptr() == t.data_ptr(), 'pin_memory of a pinned tensor copied it'; \
print('pin_memory() of a pinned tensor: the same memory')" || rc=1
  for delay in 0 0.02; do
    for depth in 0 2; do
      run=$REPO/runs/prefetch_d${depth}_r${delay}
      rm -rf "$run"
      PYTHONPATH="$REPO:$SITE" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        pretrain_syne.py --config examples/tiny/train.yaml --set parallel.tp=1 dtype=bf16 \
        "run_dir=$run" "data_prefetch=$depth" "fault_data_read_delay_s=$delay" \
        eval_interval=null log_interval=40 > "$OUT/prefetch_d${depth}_r${delay}.log" 2>&1 \
        || { echo "!!! prefetch $depth, read delay $delay: rc=$?"; rc=1; continue; }
      cp "$run/metrics.jsonl" "$OUT/prefetch_d${depth}_r${delay}.jsonl"
      "$PY" - "$run/metrics.jsonl" "$depth" "$delay" <<'EOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])][3:]
mean = lambda key: sum(r[key] for r in recs) / len(recs)
print(f"prefetch {sys.argv[2]} read delay {sys.argv[3]} s: step {1e3 * mean('step_time_s'):.2f} ms, "
      f"data wait {mean('data_wait_ms'):.2f} ms, {mean('tokens_per_s'):.0f} tok/s over {len(recs)} steps")
EOF
    done
  done
  return $rc
}

summary() {
  (cd /tmp && OUT="$OUT" "$PY" - <<'EOF'
import json, os
out = os.environ["OUT"]
for name in ("bench_train.json", "bench_train_ga4.json", "bench_train_mbs8_ga2.json",
             "bench_train_mbs8.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: missing")
        continue
    d = json.load(open(path))
    base = d["results"].get("hf", {}).get("tokens_per_s")
    print(f"{name}: {d['card']} seq {d['seq']} mbs {d['mbs']} x {d.get('grad_accum', 1)}")
    for v, r in d["results"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / base:.2f}x hf" if base else ""
        print(f"  {v:16s} {1e3 * r['step_s']:7.1f} ms {r['tokens_per_s']:8.0f} tok/s MFU {mfu} "
              f"mem {r['peak_mem_gib'] or 0:.1f} GiB {ratio} loss0 {r['losses'][0]:.4f}")
        p = r.get("profile")
        if p:  # where the step's time went (benchmarks/step_profile.py)
            cats = ", ".join(f"{k} {c['ms']:.1f}" for k, c in p["categories"].items())
            print(f"  {'':16s} profile: step {p['wall_ms']:.1f} ms = busy {p['busy_ms']:.1f} "
                  f"+ idle {p['idle_ms']:.1f}; {cats}")
            if p.get("host_syncs"):
                print(f"  {'':16s} host syncs: {p['host_syncs']['count']} "
                      f"({'; '.join(p['host_syncs']['sites'][:4])})")
    for v, e in d.get("errors", {}).items():
        print(f"  {v:16s} FAILED {e[:200]}")
    print("  checks:", d.get("checks"), "| first loss:", d.get("first_loss_on_off"),
          "| targets:", d.get("targets"))
path = os.path.join(out, "bench_kernels.json")
if os.path.exists(path):
    d = json.load(open(path))
    ok = sum(c["ok"] for c in d.get("correctness", []))
    print(f"bench_kernels.json: {d.get('card')} copy {d.get('copy_gbs', 0):.0f} GB/s, "
          f"correctness {ok}/{len(d.get('correctness', []))}")
    copy = d.get("copy_gbs") or 1.0
    for r in d.get("results", []):
        t = r.get("fwd_bwd_ms")
        if t is None:
            t = f"ERROR {str(r.get('error', r))[:80]}"
        else:
            t = (f"fwd {r['fwd_ms']:7.3f} bwd {r['bwd_ms']:7.3f} both {t:7.3f} ms; copy BW "
                 + " / ".join(f"{100 * r[k] / copy:.0f}%" for k in ("fwd_gbs", "bwd_gbs", "gbs")))
        print(f"  {r['kernel']:13s} {str(r['shape']):20s} {r['impl'][:40]:40s} {t}")
    for t in d.get("tuner", []):
        print(f"  tuner {t['name']} {t['key']}: {t['chosen']} from {t['ms']}")
else:
    print("bench_kernels.json: missing")
EOF
  )
}

export OUT PY WHL_DIR SITE STAGE REPO
export -f install_wheels stage_megasyne versions build_csrc tiny_job prefetch_ab

main() {
  echo "# gpu_check $(date -u +%FT%TZ) in $REPO, OUT=$OUT, DRY=$DRY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv 2>&1 || echo "(no nvidia-smi)"
  step install_wheels 120 install_wheels
  export PYTHONPATH="$STAGE:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  step stage 30 stage_megasyne
  step versions 90 versions

  local dry=()
  [ "$DRY" = 1 ] && dry=(--dry-run)
  if [ "${PLAN:-}" = trainer ]; then  # second call of a session: the trainer on CUDA + fused AdamW
    step tiny_job 150 tiny_job
    if [ "$(elapsed)" -lt $((BUDGET_S - 200)) ]; then
      step prefetch_ab 100 prefetch_ab
    fi
    step bench_train 130 "$PY" benchmarks/bench_train_gpu.py "${dry[@]}" --warmup 3 --steps 6 \
      --variants megasyne/triton,hf --out "$OUT/bench_train.json"
    if [ "$(elapsed)" -lt $((BUDGET_S - 70)) ]; then
      step bench_train_mbs8 70 "$PY" benchmarks/bench_train_gpu.py "${dry[@]}" --mbs 8 --warmup 2 \
        --steps 5 --variants megasyne/triton --out "$OUT/bench_train_mbs8.json"
    fi
    echo; echo "=== [$(elapsed)s] SUMMARY"; summary; echo "step status (rc):$STATUS"; return 0
  fi
  step bench_train 270 "$PY" benchmarks/bench_train_gpu.py "${dry[@]}" --warmup 3 --steps 8 \
    --variants megasyne/triton,megasyne/torch,hf,hf_bf16 --profile --out "$OUT/bench_train.json"

  if [ "$(elapsed)" -lt $((BUDGET_S - 150)) ]; then
    step bench_kernels 150 "$PY" benchmarks/bench_kernels.py "${dry[@]}" --tokens 16384 --splits 1,4 \
      --warmup 3 --reps 10 --budget-s 90 --out "$OUT/bench_kernels.json"
  else
    echo "!!! skipped bench_kernels: $(elapsed)s elapsed"; STATUS="$STATUS bench_kernels=skipped"
  fi

  if [ "$(elapsed)" -lt $((BUDGET_S - 110)) ]; then
    step bench_train_ga4 110 "$PY" benchmarks/bench_train_gpu.py "${dry[@]}" --mbs 4 --grad-accum 4 \
      --warmup 2 --steps 4 --variants megasyne/triton,hf --out "$OUT/bench_train_ga4.json"
  else
    echo "!!! skipped bench_train_ga4: $(elapsed)s elapsed"; STATUS="$STATUS bench_train_ga4=skipped"
  fi

  if [ "$(elapsed)" -lt $((BUDGET_S - 90)) ]; then  # the same tokens per step, larger GEMMs
    step bench_train_mbs8_ga2 90 "$PY" benchmarks/bench_train_gpu.py "${dry[@]}" --mbs 8 \
      --grad-accum 2 --warmup 2 --steps 4 --variants megasyne/triton,hf \
      --out "$OUT/bench_train_mbs8_ga2.json"
  else
    echo "!!! skipped bench_train_mbs8_ga2: $(elapsed)s elapsed"; STATUS="$STATUS bench_train_mbs8_ga2=skipped"
  fi

  if [ "$(elapsed)" -lt $((BUDGET_S - 60)) ]; then
    step build_csrc 60 build_csrc
  else
    echo "!!! skipped build_csrc: $(elapsed)s elapsed"; STATUS="$STATUS build_csrc=skipped"
  fi

  echo
  echo "=== [$(elapsed)s] SUMMARY"
  summary
  echo "step status (rc):$STATUS"
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu,memory.used --format=csv 2>&1 | tail -1
  echo "=== [$(elapsed)s] done"
}

main 2>&1 | tee "$OUT/log.txt"
exit 0  # per-step status is in the log; one failing step must not hide the others
