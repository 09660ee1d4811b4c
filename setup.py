"""Build rnnkern's C++ extension, rnnkern._C.

RNNKERN_CUDA decides whether the CUDA backend is built:
  auto (default)  build it when nvcc is found (CUDA_HOME), the installed torch
                  is a CUDA build, and csrc/cuda/ has sources;
  1               build it or fail saying why (a GPU-less machine can build it);
  0               CPU only.
It never asks torch.cuda.is_available(): a build machine need not have a GPU.

Building the CUDA backend needs CUDA_HOME (the toolkit with nvcc, e.g.
/usr/local/cuda) and, on a machine without a GPU, TORCH_CUDA_ARCH_LIST (e.g.
"8.0;9.0"). The cuBLAS/cuSPARSE headers that torch's CUDA headers include come
with the CUDA build of torch (its nvidia wheels, site-packages/nvidia/cu13/include)
rather than with every toolkit: setup.py finds that folder itself. Against torch
2.14 and later (and for every CUDA build) the C++ and nvcc flags say -std=c++20,
which torch 2.14's headers need.

RNNKERN_SANITIZE=1 builds the C++ with AddressSanitizer and UBSan (-O1 -g), for
`make sanitize`, which builds into its own folder (build/sanitize).
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(cuda_sources):
    mode = os.environ.get("RNNKERN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"RNNKERN_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch

    missing = []
    home = cpp_extension.CUDA_HOME
    if home is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    elif not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        # torch guesses CUDA_HOME from nvcc on PATH: a wrapper script in
        # /usr/local/bin makes that /usr/local, which is no toolkit.
        missing.append(f"CUDA_HOME={home} has no include/cuda_runtime.h (set CUDA_HOME to the "
                       "CUDA toolkit, e.g. /usr/local/cuda)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if not cuda_sources:
        missing.append("csrc/cuda/ has no sources yet")
    if mode == "1" and missing:
        sys.exit("RNNKERN_CUDA=1 but the CUDA backend cannot be built: " + "; ".join(missing))
    if not missing and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("rnnkern setup.py: TORCH_CUDA_ARCH_LIST is not set, so torch compiles for the GPUs "
              "it finds, and fails (IndexError) on a machine without one; set it, e.g. "
              "TORCH_CUDA_ARCH_LIST='8.0;9.0'", file=sys.stderr)
    return not missing


def _nvidia_include_dirs():
    """The include folders of the CUDA torch's nvidia wheels (cu13: one
    nvidia/cu13/include; older wheels: nvidia/<library>/include), found next to
    the installed torch, that hold the cuBLAS or cuSPARSE headers."""
    import site

    import torch

    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    roots += [p for p in site.getsitepackages() + [site.getusersitepackages()] if p not in roots]
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            has = any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h"))
            if has and inc not in found:
                found.append(inc)
    return found


def _cxx_std():
    """-std=c++20 against torch 2.14 and later (its headers need it), else torch's default."""
    import torch

    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return ["-std=c++20"] if (major, minor) >= (2, 14) else []


def extension():
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-fvisibility=hidden"]
    link = []
    if os.environ.get("RNNKERN_SANITIZE", "0").strip() == "1":
        # Later flags win over -O3; every finding is fatal (no recovery). At -O1
        # GCC 12 warns about its own AVX-512 intrinsics headers (`__Y` uninitialized).
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cxx += san + ["-O1", "-g", "-fno-omit-frame-pointer", "-Wno-maybe-uninitialized",
                      "-Wno-uninitialized"]
        link += san
    if _want_cuda(cuda_sources):
        std = ["-std=c++20"]
        nvidia = _nvidia_include_dirs()
        if not nvidia:
            print("rnnkern setup.py: no nvidia/*/include with cuBLAS headers next to torch; "
                  "relying on CUDA_HOME's include folder", file=sys.stderr)
        return cpp_extension.CUDAExtension(
            "rnnkern._C",
            cpu_sources + cuda_sources,
            include_dirs=nvidia,
            extra_compile_args={"cxx": cxx + std + ["-DRNNKERN_WITH_CUDA"],
                                "nvcc": ["-O3"] + std},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "rnnkern._C",
        cpu_sources,
        # libgomp is not linked: the OpenMP runtime is the one libtorch_cpu loads.
        extra_compile_args={"cxx": cxx + _cxx_std()},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["rnnkern", "rnnkern.*"]),
    # The Makefile installs the package (editable) with RNNKERN_NO_EXT=1 and then
    # builds the extension once, in place and incrementally (build_ext --inplace);
    # building it during the install too would compile every file twice.
    ext_modules=[] if os.environ.get("RNNKERN_NO_EXT", "0").strip() == "1" else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
