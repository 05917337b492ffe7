"""Build one of bionets' CUDA C++ extensions for the visible GPUs and say whether it loaded; on a
failure print the compiler's whole log (the library's own message keeps its first error line only).

    python benchmarks/build_cuda_kernels.py raa_cuda      # or arr_cuda
"""
import sys
import time

from bionets.layers import cuda_kernels

name = sys.argv[1]
start = time.perf_counter()
try:
    cuda_kernels.build(name)
except Exception as err:  # noqa: BLE001  (whatever the build raised: reported whole)
    print(f"{name} built: False ({err})\n{err.__cause__ or ''}", flush=True)
    raise SystemExit(1) from None
print(f"{name} built: True ({time.perf_counter() - start:.0f} s)", flush=True)
