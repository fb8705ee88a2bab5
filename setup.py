"""Build se_kernels and its native extension se_kernels._C.

Environment:
  SE_KERNELS_NO_EXT=1      pure-Python install (the "torch" backend, and Triton on a GPU)
  FORCE_CUDA=1             compile csrc/cuda even where no GPU is visible (needs CUDA_HOME)
  TORCH_CUDA_ARCH_LIST     GPU architectures for csrc/cuda, e.g. "8.0;9.0"
  SE_KERNELS_CPU_ISA       "avx2" or "default": the vector ISA of the CPU kernels; by default
                           AVX2+FMA+F16C when the building machine has them. The library then
                           needs those instructions on the machine that runs it.
  SE_KERNELS_DEBUG=1       -O0 -g
"""

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    """The version is written once, in se_kernels/__init__.py."""
    with open(os.path.join(ROOT, "se_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def _cpu_isa_flags():
    isa = os.environ.get("SE_KERNELS_CPU_ISA", "auto").lower()
    if isa not in ("auto", "avx2", "default"):
        raise SystemExit(f"SE_KERNELS_CPU_ISA must be auto, avx2 or default; got {isa!r}")
    if isa == "avx2" or (isa == "auto" and _cpu_has_avx2()):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _extensions():
    if os.environ.get("SE_KERNELS_NO_EXT") == "1":
        print("se_kernels: SE_KERNELS_NO_EXT=1, building no native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("SE_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    use_cuda = bool(cuda_sources) and CUDA_HOME is not None and (force_cuda or torch.cuda.is_available())
    if force_cuda and CUDA_HOME is None:
        raise SystemExit("se_kernels: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernels run on one thread.
    # At run time the extension shares the libgomp.so.1 that torch has already loaded.
    # -Werror=switch: a switch over the options (Act, Gate: csrc/se_options.h) that misses one
    # does not compile; they have no default cases. nvcc's device front end has no such check:
    # the option math is __host__ __device__, and the host compiler checks it.
    # -ffp-contract=off: the arithmetic is as written, fused multiply-adds only where a kernel
    # asks for one (at::vec::fmadd). GCC otherwise fuses a * b + c at will (its vector intrinsics
    # included), so the same formula could round differently in a vector body and its tail, or in
    # two instantiations of one loop (the relu-masked and unmasked gate-gradient sums did).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Werror=switch"] + _cpu_isa_flags()
    link = ["-fopenmp"]
    print(f"se_kernels: building {'CPU + CUDA' if use_cuda else 'CPU'} kernels, cxx flags {cxx}")
    if use_cuda:
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Werror=switch"]
        ext = CUDAExtension(
            "se_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("se_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="se_kernels",
    version=_version(),
    description="Fused Squeeze-and-Excitation for PyTorch: one op, forward and backward, on CPU and GPU",
    packages=find_packages(include=["se_kernels", "se_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    license="BSD-3-Clause",
)
