"""Build script for tbfast's optional C++ extension ``tbfast._C``.

Every ``csrc/*.cpp`` is compiled into one CPU-only extension with
``torch.utils.cpp_extension.CppExtension`` (no CUDA toolkit is needed: the cuSOLVER code
loads its library at run time). With torch >= 2.10 it is built on torch's stable C++ interface
(csrc/tbfast_torch.h, ``TORCH_TARGET_VERSION`` 2.10) and Python's limited API: one
``_C.abi3.so`` then loads on every torch >= 2.10. With an older torch (or
``TBFAST_STABLE_ABI=0``) it uses the regular ATen API and loads only on the torch release that
built it (tbfast/_backend.py checks the stamp before loading). See docs/INSTALL.md.

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
#: The stable-ABI build targets this torch (TORCH_TARGET_VERSION): its _C loads on every torch >= it.
STABLE_TORCH_MIN = (2, 10)
PY_LIMITED_API = "cp310"  # = requires-python's floor


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


def _status(state: str, reason: str | None, torch_version: str | None, stable: bool = False) -> dict:
    """The build record written to tbfast/_build_status.json."""
    return {"extension": state, "reason": reason, "torch_version": torch_version, "stable_abi": stable,
            "torch_min": ".".join(map(str, STABLE_TORCH_MIN)) if stable else torch_version,
            "python": platform.python_version(), "platform": sys.platform}


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def _stable_abi(torch_version: str) -> bool:
    """Build on torch's stable C++ interface: the default with torch >= 2.10 (TBFAST_STABLE_ABI=0
    forces the regular ATen build; =1 requires the stable one)."""
    flag = os.environ.get("TBFAST_STABLE_ABI", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    ok = _release(torch_version) >= STABLE_TORCH_MIN
    if flag in ("1", "true", "yes", "on") and not ok:
        raise SystemExit(f"tbfast: TBFAST_STABLE_ABI=1 needs torch >= {STABLE_TORCH_MIN[0]}.{STABLE_TORCH_MIN[1]} "
                         f"to build, found {torch_version}")
    return ok


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


def _remove_shadowing_builds(package_dir: str, keep: list[str]) -> None:
    """An in-place build leaves tbfast/_C.<tag>.so files of earlier builds; Python would import a
    cpython-3xx one before a new abi3 one, so the others go."""
    for path in glob.glob(os.path.join(package_dir, "_C.*.so")) + glob.glob(os.path.join(package_dir, "_C.*.pyd")):
        if os.path.abspath(path) not in keep:
            os.remove(path)


def _tolerant_build_ext(base, stable: bool):
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
                _write_status(target, _status("built", None, torch.__version__, stable))
                if self.inplace:
                    keep = [os.path.abspath(os.path.join(ROOT, self.get_ext_filename(e.name)))
                            for e in self.extensions]
                    _remove_shadowing_builds(target, keep)

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
    stable = _stable_abi(torch.__version__)
    if stable:  # csrc/tbfast_torch.h: torch's stable C++ interface, Python's limited API
        major, minor = STABLE_TORCH_MIN
        cxx_flags += ["-DTBFAST_STABLE_ABI", f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000",
                      f'-DTBFAST_TORCH_MIN="{major}.{minor}"']
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
        py_limited_api=stable,
    )
    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    cmdclass["build_ext"] = _tolerant_build_ext(base, stable)
    options = {"bdist_wheel": {"py_limited_api": PY_LIMITED_API}} if stable else {}
    return [ext], cmdclass, options


ext_modules, cmdclass, *rest = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=rest[0] if rest else {})
