# Sourced by the device-run scripts (gpu_session.sh, gpu_redrafter.sh): makes
# $OUT, installs the wheels carried in .whl (gin-config: the GPU image lacks
# it) into /tmp/site, and puts them and the checkout on PYTHONPATH.
# Usage: OUT_DEFAULT=out/name; source experiments/gpu_env.sh
set -uo pipefail
OUT=${OUT:-$OUT_DEFAULT}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
