#!/usr/bin/env bash
# The one command to run when a GPU (H100/H200) is lent: environment and matmul ceilings, the DiT at 1024² against
# diffusers' FLUX DiT, attention backends, regional compile, FP8, whole edits (28 and 20 steps), the HTTP server
# with n=1 and n=4, within 9 minutes, a short summary printed last.
#
#   bash bench/gpu-check.sh [--tiny] [--out-dir DIR] [--wheels DIR] [--limit-s N] [-- bench flags...]
#
# --out-dir  where results.md, results.json and results.log go, rewritten after every row (default: $OUT on the
#            device machine, else ./gpu-check)
# --wheels   a folder of the wheels bench/device-wheels.txt lists (bench/fetch-wheels.sh makes it): each must be
#            there; they are installed with --no-deps into a private folder put first on PYTHONPATH
# --limit-s  hard limit of the benchmark process (default 480 s; the bench stops starting measurements 30 s
#            before it, and SIGTERM at the limit still leaves its files); --tiny: the CPU dry run (default 1500 s)
# PYTHON     the interpreter (default python3: the one that holds torch on the device machine)
# WHEEL_LIST the wheel list (default bench/device-wheels.txt)
#
# On the device machine (see bench/RESULTS.md): run(command="bash bench/gpu-check.sh --wheels .whl", carry=[".whl"],
# timeout_s=600). On the CPU (.ci/run): PYTHON=... bash bench/gpu-check.sh --tiny --out-dir test-artifacts/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
LIST=${WHEEL_LIST:-bench/device-wheels.txt}
OUT_DIR=${OUT:-$ROOT/gpu-check}
WHEELS=""
LIMIT=""
TINY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=(--tiny) ;;
        --out-dir) OUT_DIR=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --limit-s) LIMIT=$2; shift ;;
        --) shift; break ;;
        *) echo "gpu-check: unknown argument $1 (bench flags go after --)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$LIMIT" ] || { [ ${#TINY[@]} -gt 0 ] && LIMIT=1500 || LIMIT=480; }
BUDGET=$((LIMIT - 30))
mkdir -p "$OUT_DIR"
START=$(date +%s)
echo "gpu-check: $(date -u +%FT%TZ) on $(hostname), python $("$PY" -c 'import sys; print(sys.version.split()[0])')," \
     "limit ${LIMIT} s, out $OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$WHEELS" ]; then
    missing=()
    wheels=()
    while read -r spec; do
        name=${spec%%==*}; version=${spec#*==}
        want=$(echo "$name" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g')-$version-
        found=""
        for f in "$WHEELS"/*.whl; do
            base=$(basename "$f" | tr 'A-Z' 'a-z')
            [ "${base#"$want"}" != "$base" ] && found=$f && break
        done
        if [ -n "$found" ]; then wheels+=("$found"); else missing+=("$spec"); fi
    done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
    if [ ${#missing[@]} -gt 0 ]; then
        echo "gpu-check: missing wheels in $WHEELS: ${missing[*]} (run bench/fetch-wheels.sh $WHEELS)" >&2
        exit 3
    fi
    SITE=${TMPDIR:-/tmp}/step1x-gpu-check-site
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || { echo "gpu-check: installing the wheels failed" >&2; exit 3; }
    export PYTHONPATH=$SITE:$PYTHONPATH
    echo "gpu-check: ${#wheels[@]} wheels installed into $SITE ($(( $(date +%s) - START )) s)"
fi

if [ ${#TINY[@]} -gt 0 ]; then  # the dry run's job: every listed package imports in this environment
    "$PY" bench/device_sim.py --check-imports --wheel-list "$LIST" || { echo "gpu-check: import check failed" >&2; exit 4; }
fi

PYTHONUNBUFFERED=1 timeout -s TERM -k 20 "$LIMIT" "$PY" -m step1x_edit.bench "${TINY[@]}" --out-dir "$OUT_DIR" \
    --budget-s "$BUDGET" "$@" > "$OUT_DIR/stdout.txt" 2>&1
rc=$?
case $rc in
    124) why="killed at the ${LIMIT} s limit (SIGTERM)" ;;
    137) why="killed (SIGKILL) after the ${LIMIT} s limit" ;;
    *) why="exit status $rc" ;;
esac
grep -E "^(ERROR|Traceback|CRITICAL)" "$OUT_DIR/stdout.txt" | tail -n 5
echo "gpu-check: benchmark $why after $(( $(date +%s) - START )) s; files: $(ls "$OUT_DIR" | tr '\n' ' ')"
STRICT=(); [ ${#TINY[@]} -gt 0 ] && STRICT=(--strict)  # the dry run fails on any failed row
"$PY" -m step1x_edit.bench_report --summary "$OUT_DIR/results.json" "${STRICT[@]}"
summary_rc=$?
[ $rc -eq 0 ] && exit $summary_rc
exit $rc
