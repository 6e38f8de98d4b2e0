#!/usr/bin/env bash
# The GPU path, checked in one go (a few minutes on an H200): benchmarks/gpu_check.py over
# models {smollm2-135m, tiny-qwen2} x precisions {float32, bfloat16, 4bit QLoRA}.
#
#   bash scripts/gpu-check.sh [--device cuda|cpu] [--out DIR] [gpu_check.py options...]
#
# Made for a lent GPU machine without network (DEVELOPERS.md, "Checking the GPU path"):
# - installs the wheels carried in $FEDTUNE_GPU_WHEELS (default .gpu/whl) into .gpu/site
#   (no index, no dependencies: the image's torch and transformers stay);
# - joins the SmolLM2 GGUF carried in parts (.gpu/model/*.gguf.part-*) into the model cache
#   ($FEDTUNE_CACHE_DIR, default .gpu/cache, kept on the machine between calls);
# - says which imports are missing; bitsandbytes is optional (4-bit is then "not checked");
# - writes gpu_check.json (gpu_check_cpu.json with --device cpu) and the log to DIR
#   (default $OUT when set, else benchmarks/results), prints a summary.
# Exit status: 0 every check passed ("not checked" is no failure), 1 a check failed,
# 2 the machine cannot run the check (no CUDA, a required package missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
device=cuda
out=${OUT:-benchmarks/results}
passthrough=()
while [ $# -gt 0 ]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) passthrough+=("$1"); shift ;;
    esac
done
wheels=${FEDTUNE_GPU_WHEELS:-$root/.gpu/whl}
site=$root/.gpu/site
export FEDTUNE_CACHE_DIR=${FEDTUNE_CACHE_DIR:-$root/.gpu/cache}
export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

install_wheels() {
    shopt -s nullglob
    local found=("$wheels"/*.whl)
    shopt -u nullglob
    if [ ${#found[@]} -eq 0 ]; then
        echo "wheels: none in $wheels (using what this Python has)"
        return
    fi
    echo "wheels: installing ${#found[@]} from $wheels into $site"
    local pip=("$python" -m pip install -q --disable-pip-version-check --no-index --no-deps
        --upgrade --target "$site")
    if ! "${pip[@]}" "${found[@]}"; then
        # One wheel this Python cannot take (another Python's build) must not stop the rest;
        # the import check below says what is still missing.
        local wheel
        for wheel in "${found[@]}"; do
            "${pip[@]}" "$wheel" 2>/dev/null || echo "wheels: $(basename "$wheel") does not install here"
        done
    fi
}

join_model_parts() {
    local gguf=SmolLM2-135M-Instruct.Q4_1.gguf
    local target=$FEDTUNE_CACHE_DIR/downloads/$gguf
    shopt -s nullglob
    local parts=("$root"/.gpu/model/"$gguf".part-*)
    shopt -u nullglob
    if [ -f "$target" ] || [ -f "$FEDTUNE_CACHE_DIR/models/smollm2-135m/fedtune-converted.json" ]; then
        echo "model: SmolLM2 already in $FEDTUNE_CACHE_DIR"
    elif [ ${#parts[@]} -gt 0 ]; then
        mkdir -p "$(dirname "$target")"
        cat "${parts[@]}" > "$target.partial"
        if "$python" -c 'import sys
from pathlib import Path
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.model_store import BUILTIN_MODELS
sys.exit(file_fingerprint(Path(sys.argv[1])) != BUILTIN_MODELS["smollm2-135m"].gguf_sha256)' \
            "$target.partial"; then
            mv "$target.partial" "$target"
            echo "model: joined ${#parts[@]} parts into $target (SHA-256 as expected)"
        else
            rm -f "$target.partial"
            echo "model: the ${#parts[@]} joined parts do not give the expected SHA-256" \
                "(a part missing?): smollm2-135m is not checked"
        fi
    else
        echo "model: no SmolLM2 GGUF here (.gpu/model/$gguf.part-*): smollm2-135m is not checked"
    fi
}

check_imports() {
    "$python" - "$device" <<'EOF'
import importlib
import sys

device = sys.argv[1]
required = ["torch", "transformers", "opacus", "opt_einsum", "scipy", "peft", "accelerate",
            "psutil", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
            "safetensors", "tokenizers", "jinja2", "numpy"]
optional = {"gguf": "needed once to convert the SmolLM2 GGUF",
            "bitsandbytes": "4-bit QLoRA is not checked without it"}
missing = []
for name in required + list(optional):
    try:
        module = importlib.import_module(name)
        print(f"  {name:18} {getattr(module, '__version__', '')}")
    except Exception as error:
        why = optional.get(name, "required")
        print(f"  {name:18} MISSING ({type(error).__name__}: {error}): {why}")
        if name in required:
            missing.append(name)
if missing:
    print(f"missing required packages: {', '.join(missing)}; carry their wheels in .gpu/whl "
          "(DEVELOPERS.md, 'Checking the GPU path')")
    sys.exit(2)
import torch

if device == "cuda" and not torch.cuda.is_available():
    print(f"no CUDA device visible to torch {torch.__version__}: nothing to check on a GPU")
    sys.exit(2)
if device == "cuda":
    print(f"CUDA: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
EOF
}

started=$(date +%s)
install_wheels
echo "imports:"
check_imports
join_model_parts
name=gpu_check.json
[ "$device" = cuda ] || name=gpu_check_$device.json
mkdir -p "$out"
status=0
"$python" benchmarks/gpu_check.py --device "$device" --offline --out "$out/$name" \
    "${passthrough[@]}" 2>&1 | tee "$out/${name%.json}.log" || status=$?
echo "gpu-check: exit $status after $(($(date +%s) - started)) s; results in $out/$name"
exit "$status"
