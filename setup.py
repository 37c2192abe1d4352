"""Build script for tbfast's optional C++ extension ``tbfast._C``.

Every ``csrc/*.cpp`` is compiled into one CPU-only extension with
``torch.utils.cpp_extension.CppExtension`` (no CUDA toolkit is needed: the cuSOLVER code
loads its library at run time).

The extension is optional. When it cannot be built (no C++ compiler, a compile or link error,
torch not importable in the build environment, ``TBFAST_NO_EXTENSION=1``) the install still
succeeds: a warning goes to stderr and ``tbfast/_build_status.json`` records why, so that
``tbfast info`` / ``tbfast.backend_info()`` can say why the compiled paths are missing.
``TBFAST_REQUIRE_EXTENSION=1`` at build time turns a failed build into an error instead.

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = "_build_status.json"  # inside the tbfast package; read by tbfast/_backend.py


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++") or "c++"


def _supports_openmp() -> bool:
    """True when the C++ compiler builds and links a tiny OpenMP program with -fopenmp."""
    if _flag("TBFAST_NO_OPENMP"):
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


def _status(state: str, reason: str | None, torch_version: str | None) -> dict:
    """The build record written to tbfast/_build_status.json."""
    return {"extension": state, "reason": reason, "torch_version": torch_version,
            "python": platform.python_version(), "platform": sys.platform}


def _write_status(package_dir: str, status: dict) -> None:
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, STATUS_FILE), "w", encoding="utf-8") as f:
        json.dump(status, f, indent=1)
        f.write("\n")


def _warn(msg: str) -> None:
    # setup.py is a build script, not library code: the warning goes to the person installing.
    bar = "=" * 78
    print(f"\n{bar}\ntbfast WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


SKIPPED: dict | None = None  # set when no extension is attempted; build_py records it


class BuildPyWithStatus(build_py):
    """build_py that records a skipped extension build in tbfast/_build_status.json."""

    def run(self):
        super().run()
        if SKIPPED is not None:
            _write_status(os.path.join(self.build_lib, "tbfast"), SKIPPED)


def _tolerant_build_ext(base):
    """A build_ext that turns a failed compile/link into a warning plus a status record."""

    class TolerantBuildExt(base):
        def run(self):
            import torch

            target = os.path.join(ROOT if self.inplace else self.build_lib, "tbfast")
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # CompileError, LinkError, ninja's RuntimeError, a missing compiler
                if _flag("TBFAST_REQUIRE_EXTENSION"):
                    raise
                why = " ".join(f"{type(exc).__name__}: {exc}".split())
                reason = f"the C++ extension failed to build ({why}; compiler {_compiler()!r})"
                self._failed = True
                _write_status(target, _status("failed", reason, torch.__version__))
                _warn(f"{reason}.\nInstalling tbfast WITHOUT tbfast._C: every op uses its pure-torch "
                      "reference (correct, slower on CPU). Install a C++ compiler and reinstall to get "
                      "the compiled kernels; `tbfast info` shows what is active.")
            else:
                _write_status(target, _status("built", None, torch.__version__))

        def get_outputs(self):
            # a failed build has no .so to install or to map into an editable install
            return [] if getattr(self, "_failed", False) else super().get_outputs()

    return TolerantBuildExt


def _extensions():
    global SKIPPED
    cmdclass = {"build_py": BuildPyWithStatus}
    if _flag("TBFAST_NO_EXTENSION"):
        print("tbfast: TBFAST_NO_EXTENSION set, installing without the C++ extension", file=sys.stderr)
        SKIPPED = _status("skipped", "installed with TBFAST_NO_EXTENSION=1", None)
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        reason = (f"torch was not importable when tbfast was built ({exc}); install torch first and "
                  "use pip install --no-build-isolation")
        if _flag("TBFAST_REQUIRE_EXTENSION"):
            raise
        _warn(reason)
        SKIPPED = _status("skipped", reason, None)
        return [], cmdclass

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    if not sources:
        SKIPPED = _status("skipped", "no csrc/*.cpp sources in this source tree", torch.__version__)
        return [], cmdclass
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
        print("tbfast: no OpenMP with this compiler; C++ kernels fall back to at::parallel_for", file=sys.stderr)
    ext = CppExtension(
        name="tbfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    cmdclass["build_ext"] = _tolerant_build_ext(base)
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
