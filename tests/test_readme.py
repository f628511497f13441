"""Every ```python block of README.md (and of docs/**/*.md) runs as written.

A block runs in a new Python process (so it sees only the imports it makes itself) in a temporary working
directory, with stand-ins for what it reads but does not define: ``images``, a small batch, and each of the
authors' released files it names (``fishnet150_ckpt.tar``), written there in their key layout
(``module.fish.fish...``, by ``fishnet_pl.models.official.official_name``) with random weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fishnet_pl
from fishnet_pl.models.official import official_name

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: The authors' file names, as their README (and ours) gives them: ``<variant>_ckpt.tar``.
OFFICIAL_FILE = re.compile(r"[\"'](fish\w+?)_ckpt\.tar[\"']")
#: What a block may use without defining it.
STAND_INS = "import runpy, torch; runpy.run_path('readme_block.py', {'images': torch.rand(2, 3, 64, 64)})"


def python_blocks() -> list[tuple[str, str]]:
    """(``file:line``, code) of every ```python block; a block repeated word for word (the front page is both
    README.md and docs/index.md) runs once."""
    blocks = {}
    for path in DOCUMENTS:
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            blocks.setdefault(match.group(1), where)
    return [(where, code) for code, where in blocks.items()]


BLOCKS = python_blocks()


def write_official_checkpoint(path: Path, variant: str) -> None:
    """A file laid out as the authors' released ``<variant>_ckpt.tar``: ``{"state_dict": {"module.<key>": ...}}``."""
    state = fishnet_pl.create_backbone(variant).state_dict()
    torch.save({"state_dict": {f"module.{official_name(k)}": v for k, v in state.items()}}, path)


def test_the_readme_has_python_blocks():
    assert any(where.startswith("README.md:") for where, _ in BLOCKS)


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs(where, code, tmp_path):
    for variant in set(OFFICIAL_FILE.findall(code)):
        write_official_checkpoint(tmp_path / f"{variant}_ckpt.tar", variant)
    (tmp_path / "readme_block.py").write_text(code)
    run = subprocess.run([sys.executable, "-c", STAND_INS], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert run.returncode == 0, f"{where}:\n{code}\n{run.stderr[-3000:]}"
