#!/usr/bin/env bash
# The GPU image has torch and triton but no bitsandbytes, and no internet: this copies this machine's bitsandbytes
# (its Python files and the CUDA 12.6 / 12.8 / 13.0 libraries, ~55 MB of the wheel's 125) into .gpu_vendor/
# (ignored by git), so that a device run that carries it (`carry: [".gpu_vendor"]`) measures issue 16's GPU target:
# benchmarks/run_gpu.sh puts .gpu_vendor on PYTHONPATH and runs benchmarks.quant_zo_memory at the Llama-3.2-1B shape
# when bitsandbytes imports. The device's working tree limit is 64 MiB, carried paths included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
src="$("$PY" -c 'import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))')"
rm -rf .gpu_vendor
mkdir -p .gpu_vendor
cp -r "$src" .gpu_vendor/bitsandbytes
find .gpu_vendor -name '__pycache__' -type d -prune -exec rm -rf {} +
for lib in .gpu_vendor/bitsandbytes/libbitsandbytes_*.so; do
    case "$(basename "$lib")" in
        libbitsandbytes_cpu.so|libbitsandbytes_cuda126.so|libbitsandbytes_cuda128.so|libbitsandbytes_cuda130.so) ;;
        *) rm -f "$lib" ;;
    esac
done
du -sh .gpu_vendor
