#!/bin/bash
# Every GPU check and benchmark in one run, each step under its own time limit, most important first
# (about 18 minutes on an H200, most of it compiling; the limits add up to more, as caps, and a step
# cut by its limit keeps what it printed). From the repository root:
#
#     bash benchmarks/gpu_checks.sh [OUT_DIR] [PART]   # default: gpu_checks/, every part
#
# bionets' dependencies must import. A GPU image without them (pydantic, pydantic-core,
# annotated-types, typing-inspection, spikingjelly, loguru) takes them from a folder .whl of wheels
# for its Python carried with the checkout, which this script installs into /tmp/bionets_site (the
# download command is in benchmarks/RESULTS.md); the checkout itself goes on PYTHONPATH.
#
# PART 1 (~7 minutes: the CUDA tests, engine, DNRT eager and under CUDA graphs), 2 (~9 minutes: Dit
# eager and under CUDA graphs, with the default strategy of the quadratic layer ('outer' eager for
# C <= 64, 'fused' Triton kernels compiled and wider) and the 'blocks' one, the suite, STDS) or 3 (the
# whole test suite, needs pytest-xdist) runs a part, for machines lent for at most 10 minutes a
# command. PART new (~4-5 minutes; its caps add up to 500 s, with the imports and kill grace about
# 550 s: give the command 590 s) runs what no GPU has run yet, issue 3's figures first: RAA's and
# ARR's CUDA C++ operators built side by side (a failed build prints the compiler's whole log, and
# the steps after it then run the Triton kernels, BIONETS_CUDA_KERNELS=0, saying so), then the CUDA
# tests of RAA's and ARR's operators only (the thirty-third session's rows kernels and ARR's scan
# passed there; since then RAA's operator takes v and c as one parameter, vc; the Triton,
# compiled-model and CUDA-graph variants passed on the H200 and are left out so the step fits its
# cap; the CPU references are PyTorch's operators, BIONETS_CPU_KERNELS=0, so that the suite's start
# builds no CPU kernels), DNRT eager (issue 3's ratios), ARR's added step split between its hook,
# its loss's forward and backward and its Python checks (arr_cost.py), RAA's step split between its
# operator and its parameter (raa_param_cost.py), and where the steps' host time goes
# (benchmarks/step_profile.py, ResNet-20 ReLU and ViT-Tiny). A
# build cut by its cap leaves torch's lock file, on which every later build of that name would wait
# forever: the step after it removes the locks.
#
# Writes OUT_DIR/gpu_checks.log (everything printed), dit.md,
# dit_compiled.md (every case under CUDA graphs), dit_blocks.md and dit_blocks_compiled.md (the quadratic layer's PyTorch strategy),
# stds.md and suite/bench.{md,png}. A failing step is reported (its exit code) and the next one runs;
# the script's own exit status is 1 where any step failed.
set -u -o pipefail
out=${1:-gpu_checks}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
last=0
step() {
    local parts=$1 limit=$2 status; shift 2
    [[ $part == all || ,$parts, == *,$part,* ]] || return 0
    echo "=== $* [limit ${limit}s] $(date +%T)"
    timeout -k 5 "$limit" "$@"
    status=$?
    echo "=== exit $status $(date +%T)"
    [[ $status == 0 ]] || failed=1
    last=$status
}
locks=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}
# torch's builder takes CUDA_HOME from nvcc's place on PATH, which a wrapper script can hide: point
# it at the toolkit where one is installed in the usual place
if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
{
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bionets_site \
            .whl/*.whl || exit 1
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [[ -d /tmp/bionets_site ]] && export PYTHONPATH="$PYTHONPATH:/tmp/bionets_site"
    python3 -c "import bionets" || { echo "bionets does not import here: carry its dependencies' wheels in .whl"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
    python3 -c "from bionets.layers import cuda_kernels as k; from torch.utils import cpp_extension as e; print('CUDA toolkit for the CUDA C++ kernels:', k.has_cuda_toolkit(), e.CUDA_HOME)"
    step new 110 bash -c 'python3 benchmarks/build_cuda_kernels.py raa_cuda & a=$!; python3 benchmarks/build_cuda_kernels.py arr_cuda & b=$!; wait $a; ra=$?; wait $b; exit $((ra | $?))'
    if [[ $part == new ]]; then
        find "$locks" -name lock -delete 2>/dev/null
        if [[ $last != 0 ]]; then        # (not rebuilt by a later step, uncapped)
            echo "=== the CUDA C++ kernels did not build (log above): the steps below run the Triton kernels"
            export BIONETS_CUDA_KERNELS=0
        fi
    fi
    step 1 200 python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py tests/test_quadratic.py -k cuda
    # (part new: the CUDA tests of RAA's and ARR's operators, 30 of them)
    step new 90 env BIONETS_CPU_KERNELS=0 python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py -k "(raa or arr or second_derivatives) and not triton and not compiled_model and not cuda_graphs"
    # the interpreter check (on the CPU; it compiles a CPU operator with Inductor, slow on some machines)
    step 1 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
    step 1 60 python3 benchmarks/bench_engine.py --device cuda
    step 1,new 80 python3 benchmarks/bench_dnrt.py --device cuda --batch 128 --repeats 20 --rounds 2 --alternate 120 --skip-compiled
    step new 80 python3 benchmarks/arr_cost.py --device cuda
    step new 70 python3 benchmarks/raa_param_cost.py --device cuda
    step new 70 python3 benchmarks/step_profile.py --device cuda --cases resnet-relu,vit
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
    exit $failed
} 2>&1 | tee "$out/gpu_checks.log"
