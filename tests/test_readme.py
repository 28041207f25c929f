"""The README's tour runs exactly as written: every block marked `<!-- readme-tour ... -->` is
executed verbatim by bash in a fresh directory, in order, with this interpreter's `kiln` on PATH."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def tour_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- readme-tour[^>]*-->\s*```(?:sh|bash)\n(.*?)```", text, flags=re.S)


def test_the_readme_tour_runs_as_written(tmp_path):
    blocks = tour_blocks()
    assert blocks, "the README lost its tour"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in blocks:
        for line in block.strip().splitlines():
            p = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=900)
            assert p.returncode == 0, f"README command failed: {line}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
            if line.startswith("kiln generate"):
                assert p.stdout.startswith("def fibonacci(n):") and len(p.stdout) > len("def fibonacci(n):\n")
            if "continue the run" in line:
                assert "continuing the run" in p.stdout and "resumed from" in p.stdout
    assert (tmp_path / "runs" / "tour" / "report.md").is_file()
