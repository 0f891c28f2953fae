"""Every Python block in README.md and docs/ runs as written, or says it is a fragment.

A block fenced as ```` ```python ```` is a program a reader may paste into a
file and run: it runs here, in a fresh interpreter in an empty directory, with
the embedded defaults, and must exit 0. A block fenced as
```` ```python fragment ```` shows a piece of code that needs something this
machine has not got (a PanDA server, a site's image, an earlier session's
workflow) or lines taken out of a larger program; it must still be valid
Python. The fences are read with markdown-it-py, the CommonMark parser, so
what is tested is what a Markdown renderer shows.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
KINDS = {"": "program", "fragment": "fragment"}


@dataclass(frozen=True)
class Block:
    """One fenced Python block: where it is, what it is, and its text."""

    page: Path
    line: int
    kind: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks() -> list[Block]:
    """Return every ```python block of the pages, in page order."""
    parser = MarkdownIt()
    blocks = []
    for page in PAGES:
        for token in parser.parse(page.read_text()):
            words = token.info.split()
            if token.type != "fence" or not words or words[0] not in ("python", "py"):
                continue
            kind = KINDS.get(" ".join(words[1:]), f"unknown ({token.info!r})")
            blocks.append(Block(page, token.map[0] + 1, kind, token.content))
    return blocks


BLOCKS = python_blocks()
PROGRAMS = [b for b in BLOCKS if b.kind == "program"]


def test_pages_hold_programs_and_the_readme_opens_with_one():
    assert PROGRAMS, "no runnable block found: the fence parsing is broken"
    readme = [b for b in BLOCKS if b.page.name == "README.md"]
    assert readme and readme[0].kind == "program", "the README's first example must run"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_block_is_valid_python_of_a_known_kind(block: Block):
    kinds = KINDS.values()
    assert block.kind in kinds, f"{block}: fence {block.kind}; use python or python fragment"
    ast.parse(block.code, filename=str(block))


@pytest.mark.slow
@pytest.mark.parametrize("block", PROGRAMS, ids=str)
def test_program_runs_as_written(block: Block, tmp_path: Path):
    here = tmp_path / "here"  # the reader's directory; source_dir="." ships it
    here.mkdir()
    script = here / "example.py"
    script.write_text(block.code)
    # A reader's machine: an empty directory, no config file, work under it.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("IDDS_FAT_", "PYTEST_", "COV_"))
    }
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), IDDS_FAT_WORK_DIR=str(tmp_path / "work"))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stderr[-4000:]}"
