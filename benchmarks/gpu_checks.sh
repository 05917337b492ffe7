#!/bin/bash
# Every GPU check and benchmark in one run, each step under its own time limit, most important first
# (about 18 minutes on an H200, most of it compiling; the limits add up to more, as caps, and a step
# cut by its limit keeps what it printed). From the repository root, with bionets and its
# dependencies importable:
#
#     bash benchmarks/gpu_checks.sh [OUT_DIR] [PART]   # default: gpu_checks/, every part
#
# PART 1 (~7 minutes: the CUDA tests, engine, DNRT eager and under CUDA graphs), 2 (~9 minutes: Dit
# eager and under CUDA graphs, with the default strategy of the quadratic layer ('outer' eager for
# C <= 64, 'fused' Triton kernels compiled and wider) and the 'blocks' one, the suite, STDS) or 3 (the
# whole test suite, needs pytest-xdist) runs a part, for machines lent for at most 10 minutes a
# command. PART new (~4-5 minutes; its caps add up to 450 s) runs what no GPU has run yet, issue 3's
# figures first: RAA's and ARR's CUDA C++ operators (and ARR's CPU one, which the tests compare
# with) built side by side, then the CUDA tests of RAA's and ARR's operators only (untested on a GPU
# since the sixteenth session: RAA's backward as one kernel whose last block sums the partial sums,
# narrow layers' columns split into slices, ARR's backward as one kernel, ViT ARR's class tokens;
# the Triton, compiled-model and CUDA-graph variants passed on the H200 and are left out so the step
# fits its cap), DNRT eager twice in separate processes (issue 3's ratios, with their run-to-run
# spread), and where the steps' host time goes (benchmarks/step_profile.py, ResNet-20 ReLU and
# ViT-Tiny). A build cut by its cap leaves torch's lock file, on which every later build of that
# name would wait forever: the step after it removes the locks.
#
# Writes OUT_DIR/gpu_checks.log (everything printed), dit.md,
# dit_compiled.md (every case under CUDA graphs), dit_blocks.md and dit_blocks_compiled.md (the quadratic layer's PyTorch strategy),
# stds.md and suite/bench.{md,png}. A failing step is reported (its exit code) and the next one runs.
set -u
out=${1:-gpu_checks}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {
    local parts=$1 limit=$2; shift 2
    [[ $part == all || ,$parts, == *,$part,* ]] || return 0
    echo "=== $* [limit ${limit}s] $(date +%T)"
    timeout -k 5 "$limit" "$@"
    echo "=== exit $? $(date +%T)"
}
# torch's builder takes CUDA_HOME from nvcc's place on PATH, which a wrapper script can hide: point
# it at the toolkit where one is installed in the usual place
if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
    python3 -c "from bionets.layers import cuda_kernels as k; from torch.utils import cpp_extension as e; print('CUDA toolkit for the CUDA C++ kernels:', k.has_cuda_toolkit(), e.CUDA_HOME)"
    step new 150 bash -c 'for k in raa_cuda arr_cuda; do python3 -c "from bionets.layers import cuda_kernels as c; print(\"$k built:\", c.ops(\"$k\") is not None)" & done; python3 -c "from bionets.layers import cpu_kernels as c; print(\"arr_cpu built:\", c.ops(\"arr_cpu\") is not None)" & wait'
    [[ $part == new ]] && find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -delete 2>/dev/null
    step 1 200 python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py tests/test_quadratic.py -k cuda
    # (part new: the CUDA tests of RAA's and ARR's operators, 29 of them)
    step new 120 python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py -k "(raa or arr or second_derivatives) and not triton and not compiled_model and not cuda_graphs"
    # the interpreter check (on the CPU; it compiles a CPU operator with Inductor, slow on some machines)
    step 1 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
    step 1 60 python3 benchmarks/bench_engine.py --device cuda
    step 1,new 80 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 20 --rounds 2 --alternate 120 --skip-compiled
    step new 80 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 20 --rounds 2 --alternate 120 --skip-compiled
    step new 80 python3 benchmarks/step_profile.py --device cuda --cases resnet-relu,vit
    step 1 90 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 10 --rounds 1 --alternate 30 --skip-compiled --vit-img 224
    # whole models under CUDA graphs (train.compile: reduce-overhead); compiling takes ~30 s a model
    step 1 150 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 10 --rounds 1 --alternate 40 --compile-mode reduce-overhead --cases vit
    step 1 190 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 10 --rounds 1 --alternate 40 --compile-mode reduce-overhead --cases resnet-gelu,resnet-relu
    step 2 100 python3 benchmarks/bench_dit.py --device cuda --macs-models '' --rounds 3 --repeats 20 --alternate 50 --out "$out/dit.md"
    step 2 200 python3 benchmarks/bench_dit.py --device cuda --macs-models '' --rounds 1 --repeats 20 --alternate 40 --compile-mode reduce-overhead --out "$out/dit_compiled.md"
    step 2 100 python3 benchmarks/bench_dit.py --device cuda --macs-models '' --rounds 3 --repeats 20 --alternate 50 --cuda-strategy blocks --out "$out/dit_blocks.md"
    step 2 200 python3 benchmarks/bench_dit.py --device cuda --macs-models '' --rounds 1 --repeats 20 --alternate 40 --cuda-strategy blocks --compile-mode reduce-overhead --out "$out/dit_blocks_compiled.md"
    step 2 60 python3 -m bionets bench --device cuda --out "$out/suite"
    step 2 90 python3 benchmarks/bench_stds.py --device cuda --out "$out/stds.md"
    # the whole suite on the GPU machine (the CUDA tests again, the rest on its CPU); needs pytest-xdist
    step 3 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests
} 2>&1 | tee "$out/gpu_checks.log"
