"""The documentation stays whole: every relative link in the Markdown files resolves inside the
repository, no committed text file points outside it, and the README stays a front door."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_files():
    """The files git tracks (plus untracked, not ignored ones), or every file if this is not a
    git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and "build" not in p.parts]


MARKDOWN = sorted(p for p in tracked_files() if p.suffix == ".md")


def test_the_docs_the_readme_names_exist():
    for name in ("README.md", "LICENSE", "docs/design.md", "docs/usage.md", "docs/performance-cpu.md",
                 "benchmarks/README.md", "tests/README.md", "examples/cifar10/README.md"):
        assert (ROOT / name).is_file(), f"{name} is missing"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same file
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
        elif ROOT not in path.parents and path != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def outside_references():
    """Patterns for what a committed file must not name, taken from this machine rather than
    written here: the checkout's own absolute path, the user's home folder, and `../NAME/` for
    each folder beside the checkout (except names the repository itself has at its top, which
    relative links from a subfolder legitimately use)."""
    own = {p.name for p in ROOT.iterdir()}
    siblings = [p.name for p in ROOT.parent.iterdir() if p.is_dir() and p != ROOT and p.name not in own]
    literal = [str(ROOT), str(Path.home())] + [f"../{name}/" for name in siblings]
    return [re.compile(re.escape(text) + (r"\b" if not text.endswith("/") else "")) for text in literal
            if len(text) > 1]


def test_no_file_points_outside_the_repository():
    """A clone is whole by itself: no committed text names a folder beside the checkout or an
    absolute path of the machine that holds it."""
    patterns = outside_references()
    offenders = []
    for path in tracked_files():
        if path.suffix in (".png", ".so", ".pt", ".gz"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{path.relative_to(ROOT)}: {p.pattern}" for p in patterns if p.search(text)]
    assert not offenders, offenders


def test_readme_is_a_front_door():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 15 * 1024, f"README.md is {size} bytes; move detail into docs/"
