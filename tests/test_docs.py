"""README.md and docs/*.md: every link resolves inside the repository (anchors included), no
issue numbers or pointers outside it, the README stays short, and its examples write distinct
files."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _links(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for m in LINK.finditer(text):
        yield m.group(1)


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


def test_every_link_resolves_inside_the_repo():
    bad = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: -- outside by design
                continue
            dest, anchor = _resolve(page, target)
            where = f"{page.relative_to(ROOT)}: ({target})"
            if ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{where} points outside the repository")
                continue
            rel = dest.relative_to(ROOT).as_posix()
            if not dest.exists():
                bad.append(f"{where} does not exist")
                continue
            if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where}: no heading #{anchor} in {rel}")
    assert not bad, "\n".join(bad)


def test_link_checker_catches_a_broken_link_and_anchor(tmp_path, monkeypatch):
    """The checker above must be able to fail: a missing file, a missing anchor, a path out."""
    page = tmp_path / "docs" / "p.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "q.md").write_text("# Real heading\n")
    page.write_text("[a](q.md#real-heading) [b](q.md#nope) [c](missing.md) [d](../../outside.md)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [page])
    with pytest.raises(AssertionError) as e:
        test_every_link_resolves_inside_the_repo()
    msg = str(e.value)
    assert "no heading #nope" in msg and "missing.md) does not exist" in msg and "outside the repository" in msg
    assert "real-heading" not in msg.replace("#real-heading) [b]", "")


def test_no_issue_numbers_or_outside_pointers():
    bad = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bissues?\s*#?\d+", line, re.I) or "shared/spec" in line or re.search(r"(?<![\w&])#\d+\b",
                                                                                                 line):
                bad.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def _readme_blocks() -> list[str]:
    return [m.group(0) for m in FENCE.finditer((ROOT / "README.md").read_text(encoding="utf-8"))]


def test_readme_is_short_and_keeps_the_commands_ci_reads():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    for marker, needle in (("<!-- run-command -->", "ladr-rt generate"), ("<!-- test-command -->", "pytest")):
        after = text.split(marker, 1)[1]
        block = after.split("```bash\n", 1)[1].split("```", 1)[0]
        assert needle in block and after.lstrip().startswith("```bash"), marker


def test_readme_examples_write_distinct_files():
    outputs = []
    for block in _readme_blocks():
        outputs += re.findall(r"--out\s+(\S+)", block)
        outputs += re.findall(r"\s>\s*(\S+\.(?:png|jpg|webp))", block)
        outputs += re.findall(r"\.save\(\"([^\"]+)\"\)", block)
    outputs = [o for o in outputs if not o.startswith("engines/")]  # build's --out is an engine name
    assert outputs and len(outputs) == len(set(outputs)), outputs
