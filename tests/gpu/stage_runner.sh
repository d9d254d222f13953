# Shared by tests/gpu/run_device_checks.sh and tests/gpu/session.sh (sourced, not run): the time-boxed stage
# runner, the stages.tsv summary and the EXIT trap that records a cut-off stage and packs ARCHIVE, and the
# install of the wheels the GPU machine's image lacks. The caller sets PYTHON, OUT, BUDGET_S, WHEEL_DIR,
# SITE_DIR and SKIP_EXIT first; `stages_start` begins the clock and the summary, `install_wheels` installs and
# checks that sd_mlperf imports (exit 2 if not), `print_environment` writes $OUT/environment.txt.
# shellcheck shell=bash

stages_start() {
  mkdir -p "$OUT"
  START=$(date +%s)
  SUMMARY="$OUT/stages.tsv"
  printf 'stage\tstatus\tseconds\n' > "$SUMMARY"
  CURRENT_STAGE=""  # the stage running now, and when it started: finish records it if the script is stopped
  STAGE_T0=$START
  trap finish EXIT
}

# record NAME STATUS SECONDS: one row of stages.tsv (a tab or newline in STATUS becomes a space).
record() {
  printf '%s\t%s\t%s\n' "$1" "$(printf '%s' "$2" | tr '\t\n' '  ' | cut -c 1-240)" "$3" >> "$SUMMARY"
  echo "== $1: $2" >&2
}

# The last line of every run that gets this far: counts of stages.tsv's outcomes.
# shellcheck disable=SC2329  # called by finish, the EXIT trap
summary_line() {
  awk -F'\t' 'NR > 1 { if ($2 == "passed") p++; else if ($2 ~ /^skipped/) s++; else if ($2 ~ /^timed out/) t++;
                       else f++ }
              END { printf "device checks: %d passed, %d failed, %d skipped, %d timed out\n", p, f, s, t }' "$SUMMARY"
}

# On every exit, an early one (import failure, outer timeout) included, when the logs matter most: record a
# stage that was cut short, pack ARCHIVE, then print the summary line last.
# shellcheck disable=SC2329  # invoked by the EXIT trap below
finish() {
  if [[ -n "$CURRENT_STAGE" ]]; then
    record "$CURRENT_STAGE" "failed (interrupted: the script stopped during this stage)" "$(( $(date +%s) - STAGE_T0 ))"
  fi
  summary_line > "$OUT/summary.txt"
  if [[ -n "${ARCHIVE:-}" ]]; then
    mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE" -C "$OUT" . && echo "packed $OUT into $ARCHIVE" >&2
  fi
  echo "total $(( $(date +%s) - START ))s; logs in $OUT"
  cat "$OUT/summary.txt"
}

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_stage NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD with a time limit of min(MAX, budget left - 20 s)
# (STAGE_LIMIT_S instead, when set), log to $OUT/NAME.log, and record its outcome in stages.tsv: passed,
# failed (rc N), timed out after N s, or skipped (reason); a stage that would get under MIN is not started.
run_stage() {
  local name=$1 max=$2 min=$3; shift 3
  local left limit rc elapsed status reason
  if [[ -n "${STAGE_LIMIT_S:-}" ]]; then
    limit=$STAGE_LIMIT_S
  else
    left=$(( $(remaining) - 20 ))
    limit=$(( max < left ? max : left ))
    if (( limit < min )); then
      record "$name" "skipped (budget: ${left}s left, the stage needs ${min}s)" 0
      return 0
    fi
  fi
  echo "== $name (up to ${limit}s)" >&2
  STAGE_T0=$(date +%s)
  CURRENT_STAGE=$name
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  CURRENT_STAGE=""
  elapsed=$(( $(date +%s) - STAGE_T0 ))
  if (( (rc == 124 || rc == 137) && elapsed >= limit )); then  # 137 before the limit: killed by something else
    status="timed out after ${limit}s"
  elif (( rc == 0 )); then
    status=passed
  elif (( rc == SKIP_EXIT )); then
    reason=$(sed -n 's/^SKIP: //p' "$OUT/$name.log" | tail -n 1)
    status=${reason:+"skipped ($reason)"}
    status=${status:-"failed (exit $SKIP_EXIT without a 'SKIP: reason' line)"}
  else
    status="failed (rc $rc)"
  fi
  tail -n 25 "$OUT/$name.log" >&2
  record "$name" "$status" "$elapsed"
}


# install_wheels: the wheels in $WHEEL_DIR into $SITE_DIR (beside the image's packages), sd_mlperf from the checkout.
install_wheels() {
  export HF_HUB_OFFLINE=1
  if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    pip_target=("$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade
                --target "$SITE_DIR")
    # One call for all (wheels sharing a top-level folder stay together); if a wheel does not fit this Python
    # that call installs nothing, so then one call per wheel, and only the misfits are left out.
    if ! "${pip_target[@]}" "$WHEEL_DIR"/*.whl > "$OUT/install.log" 2>&1; then
      failed_wheels=()
      for whl in "$WHEEL_DIR"/*.whl; do
        "${pip_target[@]}" "$whl" >> "$OUT/install.log" 2>&1 || failed_wheels+=("$(basename "$whl")")
      done
      echo "warning: these wheels did not install (see $OUT/install.log): ${failed_wheels[*]}" >&2
    fi
    export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package imports from the checkout, uninstalled
  if ! "$PYTHON" -c "import sd_mlperf.bench.train, sd_mlperf.parallel.data_parallel" > "$OUT/import.log" 2>&1; then
    tail -n 5 "$OUT/import.log" >&2
    echo "error: sd_mlperf does not import; put the missing wheels in $WHEEL_DIR" \
         "(on a networked machine: $0 --prepare-wheels $WHEEL_DIR)" >&2
    record install "failed (sd_mlperf does not import: import.log)" "$(( $(date +%s) - START ))"
    exit 2
  fi
  record install passed "$(( $(date +%s) - START ))"
}

# print_environment: Python, torch, CUDA, the GPU and which optional libraries are present ($OUT/environment.txt).
print_environment() {
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt" >&2
import platform, torch
from sd_mlperf.backends import package_available
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
names = ("transformer_engine", "apex.contrib.group_norm", "megatron.core", "nvidia.dali", "open_clip", "triton")
libs = {n: package_available(n) for n in names}
print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, "
      + ", ".join(f"{k}={v}" for k, v in libs.items()))
EOF
}
