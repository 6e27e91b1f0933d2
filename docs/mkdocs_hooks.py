"""mkdocs hook: the README (as the home page) and BENCHMARKS.md live at the repository root, outside ``docs/``.

GitHub shows them where they are, so their links are written from the root (``docs/CLI.md``) and the pages'
from ``docs/`` (``../README.md``). This hook adds both files to the site, with the files they link to, and
rewrites those links to the site's flat layout. Used by ``mkdocs.yml``; nothing else imports it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
ROOT_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "BENCHMARKS.md"}  # root file -> page in the site
LINK = re.compile(r"\]\(([^()\s#]+)")


def on_files(files, config):
    for name, page in ROOT_PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / name)))
        # an image or other file the root page links to (outside docs/) keeps its path in the site
        for target in LINK.findall((ROOT / name).read_text()):
            linked = ROOT / target
            if not target.startswith(("docs/", "http")) and target not in ROOT_PAGES and linked.is_file():
                files.append(File.generated(config, target, abs_src_path=str(linked)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in ROOT_PAGES.values():  # written from the root: docs/X.md is X.md in the site
        markdown = markdown.replace("](docs/", "](")
        return markdown.replace("](README.md", "](index.md")
    for name, site_page in ROOT_PAGES.items():  # written from docs/: ../README.md is index.md
        markdown = markdown.replace(f"](../{name}", f"]({site_page}")
    return markdown
