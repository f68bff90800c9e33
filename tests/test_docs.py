"""The documentation's own rules: the README is short with the data root in its quickstart, every path its layout
table names exists, no markdown line is longer than 200 characters, and no tracked markdown file names a path of
the machine it was written on."""
from __future__ import annotations

import re
import subprocess

import pytest

from launch_support import REPO

README = REPO / "README.md"
MAX_LINE = 200
PRIVATE = ("/work/", "/root/")


def sections(text: str) -> dict[str, str]:
    """The README's `## ` sections by title (the text up to the next `## ` heading; `###` stays inside)."""
    parts = re.split(r"^## (.+)\n", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def layout_paths(text: str) -> list[str]:
    """Every `path` in the first column of the README's layout table."""
    rows = [line for line in sections(text)["Layout"].splitlines() if line.startswith("|")]
    cells = [row.split("|")[1] for row in rows[2:]]            # skip the header and its separator
    return [p for cell in cells for p in re.findall(r"`([^`]+)`", cell)]


def markdown_files() -> list:
    return [README, REPO / "benchmarks" / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]


def tracked_markdown() -> list:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:      # a copy without .git: every markdown file of the tree
        return [p for p in REPO.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts]
    return [REPO / name for name in out.stdout.split()]


def test_the_readme_is_at_most_250_lines_with_the_data_root_in_its_quickstart():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "data.root=" in sections(text)["Quickstart"]


def test_every_path_in_the_readme_layout_table_exists():
    paths = layout_paths(README.read_text())
    assert len(paths) >= 20, paths                              # the table was found and read
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"named in README.md's layout table but not in the repository: {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_markdown_line_is_over_200_characters(path):
    long = [(n, len(line)) for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"{path.relative_to(REPO)}: lines over {MAX_LINE} characters (line, length): {long}"


def test_no_tracked_markdown_file_names_a_private_machine_path():
    found = [(str(p.relative_to(REPO)), n, line.strip()[:80])
             for p in tracked_markdown() if p.is_file()
             for n, line in enumerate(p.read_text().splitlines(), 1) if any(s in line for s in PRIVATE)]
    assert not found, found
