"""The README's Python snippets run as written.

Every fenced block that opens with three backticks and ``python`` in README.md is executed, on
its own, in a fresh namespace, with a temporary working directory. Indented blocks and
``console`` / shell blocks are not run (they are shell commands or pseudo-code); write a snippet
that should be checked as a fenced ``python`` block.

A snippet that cannot run here is marked by an HTML comment (invisible on GitHub) on the line
just before its opening fence:

- ``<!-- readme-test: skip (reason) -->``: never run (say why, e.g. "downloads a model");
- ``<!-- readme-test: requires NAME[, NAME...] -->``: run only when every NAME is importable;
  the NAME ``cuda`` means a CUDA device (``torch.cuda.is_available()``).

Keep snippets quick (a few seconds on a 2-core CPU): build a tiny model in the snippet itself.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(r"^```\s*python\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|requires)\b(.*?)-->\s*$")


@dataclass
class Snippet:
    line: int  # line of the opening fence (1-based)
    code: str
    skip: str | None  # reason, or None
    requires: tuple[str, ...]


def extract_snippets(text: str) -> list[Snippet]:
    """The fenced ``python`` blocks of a Markdown text, with their readme-test markers."""
    lines = text.splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        if not _FENCE.match(lines[i].strip()):
            i += 1
            continue
        start = i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: python block is never closed")
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip, requires = None, ()
        m = _MARKER.match(prev)
        if m and m.group(1) == "skip":
            skip = m.group(2).strip(" ()") or "marked skip"
        elif m:
            requires = tuple(n.strip() for n in m.group(2).split(",") if n.strip())
        out.append(Snippet(start + 1, "\n".join(body) + "\n", skip, requires))
        i += 1
    return out


SNIPPETS = extract_snippets(README.read_text(encoding="utf-8"))


def test_extraction_finds_the_quick_tour():
    assert SNIPPETS, "no ```python block found in README.md"
    assert any("tbfast.layer_metrics(" in s.code for s in SNIPPETS)


def test_extraction_honours_markers():
    text = ("x\n```python\na = 1\n```\n\n<!-- readme-test: skip (downloads a model) -->\n```python\nb = 2\n```\n"
            "<!-- readme-test: requires lightning, cuda -->\n\n``` python\nc = 3\n```\n```console\n$ ls\n```\n"
            "    indented = 4\n")
    got = [(s.line, s.code, s.skip, s.requires) for s in extract_snippets(text)]
    assert got == [(2, "a = 1\n", None, ()), (7, "b = 2\n", "downloads a model", ()),
                   (12, "c = 3\n", None, ("lightning", "cuda"))]


def _missing(requires: tuple[str, ...]) -> list[str]:
    missing = []
    for name in requires:
        if name == "cuda":
            if not torch.cuda.is_available():
                missing.append("a CUDA device")
        elif importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"README.md:{s.line}" for s in SNIPPETS])
def test_readme_snippet_runs(snippet: Snippet, tmp_path, monkeypatch):
    if snippet.skip:
        pytest.skip(f"README.md:{snippet.line}: {snippet.skip}")
    missing = _missing(snippet.requires)
    if missing:
        pytest.skip(f"README.md:{snippet.line} needs {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(snippet.code, f"README.md:{snippet.line}", "exec"), namespace)
    if "tbfast.layer_metrics(" in snippet.code:  # the quick tour: one row / one alpha per weight matrix
        model = namespace["model"]
        n = sum(isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) for mod in model.modules())
        assert n > 0
        assert len(namespace["m"].to_pandas()) == n
        assert namespace["fit"].alpha.shape == (n,)
        spectra = namespace["spectra"]
        first = next(mod for mod in model.modules() if isinstance(mod, torch.nn.Linear))
        sv = torch.linalg.svdvals(first.weight.detach().double())  # the oracle: squared singular values
        torch.testing.assert_close(spectra[0].double(), sv.square().flip(0), rtol=1e-4, atol=1e-6)
