#!/usr/bin/env bash
# The GPU validation grid in one command, on a bare GPU machine without network.
#
#   bash benchmarks/gpu_validate.sh OUT_DIR [--budget-s 420] [--dry-run] [--only REGEX] [--skip-existing DIR]
#                                   [--reserved-s S]
#
# 1. bitsandbytes: if Python cannot find it, install the wheel shipped in .whl/ (git-ignored; fetch it with
#    the `pip download` line in ../shared/NOTES.md) into a --target folder put on PYTHONPATH.
# 2. benchmarks/gpu_validate.py with the budget left after step 1, under `timeout`: at the budget it gets
#    SIGINT (finishes cleanly, every completed result already written), 30 s later SIGKILL.
# With --reserved-s S, first benchmarks/gpu_reserved.py (issue 20: the allocator replay's max reserved and
# segments against torch's) for at most S seconds of the budget, into OUT_DIR/reserved/.
set -u
start=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: gpu_validate.sh OUT_DIR [--budget-s S] [gpu_validate.py options]}"
shift
budget=420
reserved=0
dry=()
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget="$2"; shift 2 ;;
    --budget-s=*) budget="${1#*=}"; shift ;;
    --reserved-s) reserved="$2"; shift 2 ;;
    --dry-run) dry=(--dry-run); args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
py="${PYTHON:-python3}"
mkdir -p "$out"

has_bnb() { "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("bitsandbytes") is None)'; }
if ! has_bnb; then
  whl="$(ls "$repo"/.whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)"
  if [ -n "$whl" ]; then
    deps="${TMPDIR:-/tmp}/peftplan-deps"
    echo "gpu_validate.sh: installing $(basename "$whl") into $deps" >&2
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
      --no-compile --target "$deps" "$whl" >&2 \
      || "$py" -m zipfile -e "$whl" "$deps"  # a wheel is a zip: unpacked on sys.path it imports the same
    export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
    has_bnb || echo "gpu_validate.sh: bitsandbytes still not importable: QLoRA and 8-bit points will fail" >&2
  else
    echo "gpu_validate.sh: no bitsandbytes and no wheel in .whl/: QLoRA and 8-bit points will fail" >&2
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "${reserved%.*}" -gt 0 ]; then
  timeout --signal=INT --kill-after=20 $(( ${reserved%.*} + 20 )) \
    "$py" "$repo/benchmarks/gpu_reserved.py" --out "$out/reserved" --budget-s "${reserved%.*}" "${dry[@]}" \
    || echo "gpu_reserved.py: exit $? (see $out/reserved)" >&2
fi
left=$(( ${budget%.*} - ($(date +%s) - start) ))
[ "$left" -gt 30 ] || left=30
timeout --signal=INT --kill-after=30 $(( left + 20 )) \
  "$py" "$repo/benchmarks/gpu_validate.py" --out "$out" --budget-s "$left" "${args[@]}"
rc=$?
echo "gpu_validate.sh: exit $rc after $(( $(date +%s) - start ))s; results in $out" >&2
exit $rc
