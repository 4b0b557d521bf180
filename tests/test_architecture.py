"""The folders are the layers: import-linter checks the contract declared in pyproject.toml,
and no module grows past the size a reader can hold in mind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def test_layers_contract_is_kept():
    p = subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_modules_stay_small():
    big = []
    for folder in ("compiler", "frontends", "backends", "fuse", "schemas"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = path.read_text().count("\n")
            if lines > 800:
                big.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not big, big
