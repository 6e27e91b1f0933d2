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


# Every document a reader follows links in; BENCHMARKS.md is linked from all of them and links back.
LINKED = [*DOCUMENTS, ROOT / "BENCHMARKS.md"]


def _prose(text: str) -> str:
    """A Markdown text without its fenced blocks and inline code, where a ``[x](y)`` or a ``#`` is no link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings: lower case, punctuation dropped, each space a hyphen, a
    repeated heading numbered ``-1``, ``-2``, …  Code in a heading counts (its backticks are dropped); an HTML
    ``<a id="…">`` is an anchor too."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        repeat = 0
        while (slug if repeat == 0 else f"{slug}-{repeat}") in found:
            repeat += 1
        found.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return found | set(re.findall(r'<a (?:id|name)="([^"]+)"', text))  # an anchor set by hand


def broken_links(document: Path) -> list[str]:
    """Relative links of a document (``[text](path#anchor)``, images too) whose file or heading does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^()\s]+)\)", _prose(document.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: — the web is not checked
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.name}")
    return broken


def test_anchors_are_githubs():
    text = "# The `mlaan` command\n## Frontier: memory (BP)\n```\n# not a heading\n```\n## Frontier: memory (BP)\n"
    assert anchors(text) == {"the-mlaan-command", "frontier-memory-bp", "frontier-memory-bp-1"}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# A\n[ok](#a) [ok](b.md#b) [no](b.md#c) [no](c.md) `[code](x.md)`\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert [b.split(":")[0] for b in broken_links(tmp_path / "a.md")] == ["b.md#c", "c.md"]


@pytest.mark.parametrize("document", LINKED, ids=lambda d: d.name)
def test_every_link_resolves(document):
    assert broken_links(document) == []
