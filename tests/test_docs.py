"""The documentation: README.md stays short, and every relative link and image in README.md and docs/*.md
points at a file that exists; the measurements in docs/bench/ are named as bench.py names its rows."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES, MAX_BYTES = 300, 25 * 1024

FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)  # code blocks: their brackets are code, not links
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")  # [text](target "title")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)  # [label]: target
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def link_targets(text: str) -> list[str]:
    """Every link and image target of a Markdown text, outside code."""
    text = INLINE_CODE.sub("", FENCED.sub("", text))
    return [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK) for m in pattern.finditer(text)]


def broken_links(page: Path) -> list[str]:
    """The relative targets of `page` that resolve to no file or folder (http(s), mailto and #anchors skipped;
    a #fragment is dropped before checking)."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if re.match(r"(?i)(https?:|mailto:|#)", target) or not target:
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def test_readme_is_short():
    data = README.read_bytes()
    lines = data.decode("utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines, more than {MAX_LINES}: move detail into docs/"
    assert len(data) <= MAX_BYTES, f"README.md has {len(data)} bytes, more than {MAX_BYTES}: move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} links to files that do not exist"


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#part) [web](https://example.org/x) [top](#top) ![gone](missing.png)\n"
                    "[gone too](sub/missing.md#part)\n```\n[in code](not-a-link.md)\n```\n`[inline](code.md)`\n"
                    '<img src="no.png">\n[label]: nowhere.md\n')
    assert broken_links(page) == ["missing.png", "sub/missing.md#part", "nowhere.md", "no.png"]


def test_bench_files_are_named_as_bench_py_names_its_rows():
    """Each docs/bench/<row>.json holds one configuration, under the name bench.py gives it, so that measuring
    the row again overwrites it."""
    from bench import CONFIGS, row_name
    files = sorted((ROOT / "docs" / "bench").glob("*.json"))
    assert files
    for path in files:
        if path.name == "knn.json":  # bench.py knn's one file
            continue
        result = json.loads(path.read_text())
        (name, row), = result["configs"].items()
        assert name in CONFIGS, path.name
        device = result["machine"].rsplit("tinygrad ", 1)[1]
        if "batches" in row:  # bench.py act's: act_<row>
            expected = "act_" + row_name(name, row["updates_before"], False, 0, device)
        else:
            expected = row_name(name, result["updates_before_steady"], "plain_steady" in row,
                                result["fast_path_beam"], device)
        assert path.stem == expected, f"{path.name} holds what bench.py would write to {expected}.json"
