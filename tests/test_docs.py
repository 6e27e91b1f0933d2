"""Every Python block of README.md and docs/*.md runs as pasted, so that the documentation cannot rot.

A document's blocks run in order, each in a fresh namespace (a block that needs ``torch`` imports it), in one
subprocess per document started in an empty folder: a block may read a file an earlier block wrote, and what a
block registers (a plug-in method) does not leak into the other tests. A block that imports an optional package
that is not installed (timm) is skipped and said so; any other failure names the block's first line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONAL = ("timm", "matplotlib", "tensorboard")

# Runs in the subprocess: argv[1] is a JSON list of [line, source] blocks.
RUNNER = r"""
import json, sys, traceback
blocks = json.loads(sys.argv[1])
results = []
for line, source in blocks:
    try:
        exec(compile(source, f"block at line {line}", "exec"), {"__name__": "__main__"})
        results.append([line, "ran", ""])
    except ModuleNotFoundError as error:
        if error.name in OPTIONAL:
            results.append([line, "skipped", f"{error.name} is not installed"])
        else:
            results.append([line, "failed", traceback.format_exc()])
    except BaseException:
        results.append([line, "failed", traceback.format_exc()])
print("RESULTS " + json.dumps(results))
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line, source) of each fenced ```python block of a Markdown text."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if python_blocks(d.read_text())], ids=lambda d: d.name)
def test_every_python_block_runs_as_pasted(tmp_path, document):
    blocks = python_blocks(document.read_text())
    _stand_ins(tmp_path)
    code = f"OPTIONAL = {OPTIONAL!r}\n{RUNNER}"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(blocks)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    failed = [f"{document.name}, block at line {line}:\n{why}" for line, status, why in results if status == "failed"]
    assert not failed, "\n".join(failed)
    assert len(results) == len(blocks)
    assert any(status == "ran" for _, status, _ in results)


def _stand_ins(folder: Path) -> None:
    """Files the documents' blocks read that a command of theirs writes: ``resnet32.pt`` is what
    ``mlaan export --out resnet32.pt`` writes for the demo's run (the backbone's state_dict; tests/test_cli.py
    checks that an export loads this way)."""
    import torch

    import mlaan

    net = mlaan.models.create("resnet32", num_classes=10, in_channels=1, image_size=32)
    torch.save(net.state_dict(), folder / "resnet32.pt")


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
