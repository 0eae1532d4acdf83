#!/usr/bin/env bash
# GPU check: VGG-19 compiled on the CPU vs a GPU, float32 vs mixed precision, and the
# worker's batched path (Classifier.predict at THYROCAD_GPU_BATCH_MAX), each with a ratio
# against a baseline measured in the same run (bench/gpu_check.py says how).
#
#   bench/gpu_check.sh [--gpu N] [--input-size 224] [--batch 128] [--repeats 5]
#
# Runs under KERAS_BACKEND=jax or torch, the first whose backend sees a GPU (TensorFlow
# need not be installed). Without a GPU it prints "no GPU: <why>" and exits 0.
# PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
GPU=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == "--gpu" && $((i + 1)) -lt ${#args[@]} ]]; then GPU="${args[i + 1]}"; fi
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPU: nvidia-smi is not installed (no NVIDIA driver on this machine)"
    exit 0
fi
if ! listed="$(nvidia-smi -L 2>&1)" || ! grep -q "^GPU ${GPU}:" <<<"$listed"; then
    echo "no GPU: nvidia-smi -L lists no GPU ${GPU}: $(head -n 1 <<<"$listed")"
    exit 0
fi
echo "nvidia-smi: $(grep "^GPU ${GPU}:" <<<"$listed")"

why=()
for backend in jax torch; do
    if ! seen="$(KERAS_BACKEND=$backend "$PY" bench/gpu_check.py --probe --gpu "$GPU" 2>/dev/null)"; then
        why+=("$backend: not importable")
        continue
    fi
    seen="$(tail -n 1 <<<"$seen")"
    if [[ "$seen" == gpu\ * ]]; then
        exec env KERAS_BACKEND="$backend" "$PY" bench/gpu_check.py "$@"
    fi
    why+=("$backend sees only ${seen#cpu }")
done
reasons="$(printf '%s; ' "${why[@]}")"
echo "no GPU: nvidia-smi lists GPU ${GPU} but no Keras backend sees it (${reasons%; }); install a CUDA build of jax (jax[cuda12]) or torch"
exit 0
