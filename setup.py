"""Build script for tbfast's optional C++ extension ``tbfast._C``.

Every ``csrc/*.cpp`` is compiled into one CPU-only extension with
``torch.utils.cpp_extension.CppExtension`` (no CUDA toolkit is needed: the cuSOLVER code
loads its library at run time). Set ``TBFAST_NO_EXTENSION=1`` for a pure-Python install.

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_extension() -> bool:
    return os.environ.get("TBFAST_NO_EXTENSION", "").strip().lower() not in ("1", "true", "yes", "on")


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++") or "c++"


def _supports_openmp() -> bool:
    """True when the C++ compiler builds and links a tiny OpenMP program with -fopenmp."""
    if os.environ.get("TBFAST_NO_OPENMP", "").strip() in ("1", "true", "yes", "on"):
        return False
    code = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\nreturn n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.cpp")
        with open(src, "w") as f:
            f.write(code)
        try:
            res = subprocess.run(
                [_compiler(), "-fopenmp", src, "-o", os.path.join(tmp, "omp_check")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def _extensions():
    if not _want_extension():
        print("tbfast: TBFAST_NO_EXTENSION set, installing without the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        print(f"tbfast: torch not importable ({exc}); installing without the C++ extension "
              "(install torch first and use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    if not sources:
        return [], {}
    # The sources are C++17; no -std flag here so torch adds the standard its headers need
    # (c++17 up to torch 2.9, c++20 from 2.10).
    cxx_flags = ["-O3", "-fno-math-errno", f'-DTBFAST_TORCH_VERSION="{torch.__version__}"']
    link_flags = []
    if sys.platform.startswith("linux"):
        link_flags.append("-ldl")
    if _supports_openmp():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        print("tbfast: compiler has no OpenMP support; C++ kernels fall back to at::parallel_for", file=sys.stderr)
    ext = CppExtension(
        name="tbfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
