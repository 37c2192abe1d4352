"""Packaging: the sdist's file list, one version number, the torch floor, the build record and
the torch-version check of tbfast._C (docs/INSTALL.md).

Tests that read the source tree (setup.py, MANIFEST.in, .ci/run) skip when the tests run from a
copy against an installed tbfast (scripts/check_sdist.sh, scripts/torch_matrix.sh).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import tbfast
from tbfast import _backend
from childproc import run_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(tbfast.__file__)))
SOURCE_TREE = os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "tbfast"))
needs_source = pytest.mark.skipif(not SOURCE_TREE, reason="needs the source tree (tests run from a copy)")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------ source tree


@needs_source
def test_readme_test_command_is_the_ci_command():
    """.ci/run runs the README's test command verbatim (then the extra install checks)."""
    readme = _read("README.md")
    block = readme[readme.index("**Run the tests**"):]
    cmd = next(line.strip() for line in block.splitlines() if line.startswith("    pip install"))
    ci = [line.strip() for line in _read(".ci", "run").splitlines()]
    first = next(i for i, line in enumerate(ci) if line and not line.startswith("#") and "pip install" in line)
    assert ci[first] == cmd


@needs_source
def test_sdist_file_list_has_every_csrc_file(tmp_path):
    """setuptools' file list (egg_info SOURCES.txt, what the sdist carries) holds every C++ source
    AND header: without csrc/*.h a wheel built from the sdist cannot compile."""
    env = dict(os.environ, TBFAST_NO_EXTENSION="1")
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    sources = set((tmp_path / "tbfast.egg-info" / "SOURCES.txt").read_text().split())
    csrc = {f"csrc/{n}" for n in os.listdir(os.path.join(ROOT, "csrc")) if n.endswith((".h", ".cpp"))}
    assert any(n.endswith(".h") for n in csrc)
    assert csrc <= sources, sorted(csrc - sources)
    assert not [s for s in sources if s.endswith((".so", "_build_status.json"))]


@needs_source
def test_version_lives_in_one_place():
    pyproject = _read("pyproject.toml")
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M)  # no second, literal copy
    assert 'version = { attr = "tbfast.__version__" }' in pyproject
    literal = re.search(r'^__version__ = "([^"]+)"$', _read("tbfast", "__init__.py"), re.M).group(1)
    assert tbfast.__version__ == literal


@needs_source
def test_torch_floor_is_the_tested_one():
    """pyproject's torch floor is the lowest torch in docs/INSTALL.md's tested table, and no lower
    than the torch.library API the op layer calls needs (register_fake / register_kernel: 2.4)."""
    floor = re.search(r'"torch>=([0-9.]+)"', _read("pyproject.toml")).group(1)
    assert tuple(map(int, floor.split("."))) >= (2, 4)
    doc = _read("docs", "INSTALL.md")
    tested_section = doc[doc.index("\n## Tested\n"):]
    tested_section = tested_section[:tested_section.index("\n## ", 1)]
    table = [line for line in tested_section.splitlines() if re.match(r"^\| \d+\.\d+", line)]
    tested = sorted(tuple(map(int, re.match(r"^\| (\d+)\.(\d+)", row).groups())) for row in table)
    assert tested and tested[0] == tuple(map(int, floor.split(".")[:2])), (floor, tested)


# ------------------------------------------------------------------------------ torch-version check

STAMP = {"abi": 2, "torch_version": "2.13.0+cpu", "path": "/x/_C.so"}


def test_same_release_other_local_tag_loads():
    assert _backend.torch_mismatch(STAMP, running="2.13.0+cpu") is None
    assert _backend.torch_mismatch(STAMP, running="2.13.0+cu130") is None
    assert _backend.torch_mismatch({"abi": 2}, running="2.14.1") is None  # no torch named: nothing to compare


@pytest.mark.parametrize("running", ["2.14.1", "2.13.1+cpu", "2.4.1+cu121"])
def test_other_release_is_refused_naming_both(running):
    msg = _backend.torch_mismatch(STAMP, running=running)
    assert msg == (f"tbfast._C extension /x/_C.so was built against torch 2.13.0+cpu, but this process runs "
                   f"torch {running}; not loaded (a compiled extension is tied to its torch version)")


def test_stable_abi_build_runs_on_later_torch_only():
    stable = dict(STAMP, stable_abi=True, torch_min="2.10")
    assert _backend.torch_mismatch(stable, running="2.14.1+cu130") is None
    assert _backend.torch_mismatch(stable, running="2.10.0") is None
    msg = _backend.torch_mismatch(stable, running="2.9.1")
    assert "torch >= 2.10" in msg and "2.9.1" in msg and "2.13.0+cpu" in msg


_OTHER_TORCH_SCRIPT = """
import json, logging, math, sys, warnings
import torch
torch.__version__ = RUNNING  # this process pretends to run another torch release
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger("tbfast").addHandler(Keep(level=logging.WARNING))
import tbfast
x = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
alpha, D, index = torch.ops.tbfast.hill_fit(x, torch.tensor([0]), torch.tensor([5]), 2.0)
spectra = tbfast.esd(torch.nn.Linear(16, 8))
info = tbfast.backend_info()
print(json.dumps({"ext": info["extension"], "active": info["active"]["cpu"], "loaded_C": "tbfast._C" in sys.modules,
                  "warnings": [r.getMessage() for r in records], "alpha": alpha.item(), "index": index.item()}))
"""


@pytest.mark.skipif(_backend.extension_details()["path"] is None, reason="tbfast._C extension not built")
def test_extension_for_another_torch_is_not_loaded():
    """A _C whose stamp does not fit this torch is never loaded: the pure-torch fallbacks run and
    ONE warning names both versions; backend_info() says so. A regular build fits only the torch
    release that built it (here: a pretended 2.99.0); a stable-ABI build every torch >= its
    torch_min (here: a pretended 2.9.0, below it)."""
    built = _backend.extension_details()["build"]
    if built.get("stable_abi"):
        running = "2.9.0+fake"
        want = (f"uses torch's stable C++ interface for torch >= {built['torch_min']} (built with torch "
                f"{built['torch_version']}); this process runs torch 2.9.0+fake")
    else:
        running = "2.99.0+fake"
        want = f"was built against torch {built['torch_version']}, but this process runs torch 2.99.0+fake"
    got = run_json(_OTHER_TORCH_SCRIPT.replace("RUNNING", repr(running)), PKG_PARENT)
    assert got["loaded_C"] is False  # the shared library was not even dlopen'ed
    assert got["ext"]["loaded"] is False
    assert want in got["ext"]["torch_mismatch"] and want in got["ext"]["reason"]
    assert len(got["warnings"]) == 1 and want in got["warnings"][0], got["warnings"]
    assert got["active"] == {"eigensolver": "torch.linalg.eigvalsh", "fits": "torch reference"}
    # the fallback computes the SPEC fit: i = int(5 / 2) = 2, alpha = 1 + 3 / (ln 2 + ln 4 + ln 8 - 3 ln 2)
    import math
    assert got["index"] == 2
    assert got["alpha"] == pytest.approx(1 + 3 / (math.log(4) + math.log(8) - 2 * math.log(2)), rel=1e-12)


# ------------------------------------------------------------------------------ build record


def test_failed_build_record_explains_the_missing_extension(monkeypatch):
    """When setup.py could not build tbfast._C, backend_info() carries the build record's reason."""
    with tempfile.TemporaryDirectory() as tmp:
        record = os.path.join(tmp, "_build_status.json")
        with open(record, "w") as f:
            json.dump({"extension": "failed", "reason": "the C++ extension failed to build (CompileError: "
                       "command '/bin/false' failed with exit code 1; compiler '/bin/false')",
                       "torch_version": torch.__version__}, f)
        real_open = open

        def fake_open(path, *a, **k):
            return real_open(record if str(path).endswith("_build_status.json") else path, *a, **k)

        monkeypatch.setattr("builtins.open", fake_open)
        status = _backend.build_status()
        reason = _backend._missing_reason(ImportError("No module named 'tbfast._C'"))
    assert status["extension"] == "failed"
    assert reason.startswith("not built at install time: the C++ extension failed to build (CompileError")
    assert reason.endswith("[ImportError: No module named 'tbfast._C']")


# ------------------------------------------------------------------------------ stable-ABI build


def _undefined_symbols(path: str) -> list[str]:
    import shutil
    if not (shutil.which("nm") and shutil.which("c++filt")):
        pytest.skip("needs nm and c++filt (binutils)")
    nm = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, timeout=120)
    names = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=120)
    return demangled.stdout.splitlines()


def test_stable_build_uses_only_the_c_shim_of_libtorch():
    """A stable-ABI tbfast._C imports no C++ symbol of libtorch / c10 (those change with every torch
    release), only the C shim (aoti_torch_* / torch_*) and CPython's limited API: that is what
    lets one build load on every torch >= its torch_min."""
    ext = _backend.extension_details()
    if not ext["loaded"]:
        pytest.skip("tbfast._C extension not loaded")
    if not ext["build"].get("stable_abi"):
        pytest.skip("a regular (torch-version-bound) build")
    symbols = _undefined_symbols(ext["path"])
    cxx = [s for s in symbols if re.match(r"^(c10|at|torch|caffe2)::", s)]
    assert cxx == []
    assert any(s.startswith("torch_library_impl") for s in symbols)
