# Sourced by bench/gpu.sh and bench/gpu_multi.sh (not run on its own): the repository root as working folder,
# OUT (the results folder, the script's first argument), PYTHON, PYTHONPATH, and elapsed/log, which tag each line
# with the script's name and append it to OUT/<name>.log.
OUT=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SCRIPT_NAME=$(basename "$0" .sh)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[$SCRIPT_NAME.sh $(elapsed)s] $*" | tee -a "$OUT/$SCRIPT_NAME.log"; }
