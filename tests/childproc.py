"""Running a test's script in a child Python (a fresh interpreter: import-time behaviour, no
extension, another torch version) and reading the JSON it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_json(script: str, path: str) -> Any:
    """Run ``script`` with ``python -c`` and ``path`` first on PYTHONPATH; assert it exits 0 (its
    stderr's tail in the message) and return the JSON of its last line of output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
