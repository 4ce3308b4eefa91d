"""The repository stands alone: no tracked file points at a specification outside it, and every
citation of a page in docs/ ("docs/math.md §3.4", "§9 rows 2 and 17", "§5 of docs/math.md") names a
page, a section heading and a property-table row that exist.

The files are those git tracks (`git ls-files`), or, outside a git checkout, the tree without its
virtual environment and caches. This file is left out of both scans: its examples of bad citations
are meant to be bad.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()
NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".benchmarks"}

# the team's specification folder, by relative or absolute path, and a spec page named without docs/
OUTSIDE = re.compile(
    r"\.\./shared|shared[/\\]spec|[/\\]work[/\\]shared"
    r"|official[-]architecture"
    r"|(?<![\w/.-])(?:math|performance)\.md"
)

SECTION = r"§[0-9A-Z][0-9a-z.]*(?:[–-][0-9][0-9.]*)?"
ROWS = r"rows?\s+[0-9]+(?:\s*(?:–|,|and)\s*[0-9]+)*"
PAGE = re.compile(r"docs/([\w-]+\.md)`?")
# what may follow a page name: sections, rows and appendix items, joined by commas, "and", dashes
TAIL = re.compile(rf"(?:\s*(?:,|and\b|{SECTION}|{ROWS}|\bA[0-9]+\b))*")
# "§5 of docs/math.md", "rows 27 and 28 of docs/math.md §9"
BEFORE = re.compile(rf"({SECTION}|{ROWS})\s+of\s+`?docs/([\w-]+\.md)")
HEADING = re.compile(r"^#{1,6}\s+([0-9]+(?:\.[0-9]+)*|A[0-9]+)\b", re.MULTILINE)
TABLE_ROW = re.compile(r"^\|\s*([0-9]+)\s*\|", re.MULTILINE)


def _repository_files() -> list[Path]:
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        files = [ROOT / name for name in listing.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        files = [
            path
            for path in ROOT.rglob("*")
            if path.is_file()
            and not NOT_SOURCE.intersection(path.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in path.parts)
        ]
    return [path for path in files if path.is_file() and path.resolve() != THIS_FILE]


def _texts() -> dict[str, str]:
    texts = {}
    for path in _repository_files():
        try:
            texts[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images
            continue
    return texts


def _outside_references(name: str, text: str) -> list[str]:
    return [
        f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group()!r}"
        for match in OUTSIDE.finditer(text)
    ]


def _numbers(rows: str) -> list[int]:
    """'rows 2 and 17' -> [2, 17]; 'rows 29–33' -> [29, …, 33]."""
    numbers = []
    for first, last in re.findall(r"([0-9]+)(?:\s*–\s*([0-9]+))?", rows):
        numbers += range(int(first), int(last or first) + 1)
    return numbers


def _targets(words: str) -> list[tuple[str, str]]:
    """('section', '3.4') and ('row', '21') items of a citation's words."""
    targets = []
    for number, until in re.findall(
        r"§([0-9]+(?:\.[0-9]+)*|[A-Z][0-9]*)[a-z]?(?:-[0-9]+)?(?:–([0-9.]+))?", words
    ):
        targets += [("section", number.rstrip("."))] + ([("section", until.rstrip("."))] if until else [])
    for rows in re.findall(ROWS, words):
        targets += [("row", str(number)) for number in _numbers(rows)]
    targets += [("section", item) for item in re.findall(r"\bA[0-9]+\b", words)]
    return targets


def _citations(text: str) -> list[tuple[str, str, str]]:
    """Every (page, 'section' or 'row', number) that a text cites in docs/."""
    cited = []
    for page in PAGE.finditer(text):
        tail = TAIL.match(text, page.end()).group()
        cited += [(page.group(1), kind, number) for kind, number in _targets(tail)]
    for words, page in BEFORE.findall(text):
        cited += [(page, kind, number) for kind, number in _targets(words)]
    return cited


def _unresolved(cited: list[tuple[str, str, str]], docs: Path) -> list[str]:
    problems = []
    for page, kind, number in cited:
        path = docs / page
        if not path.is_file():
            problems.append(f"docs/{page} does not exist")
            continue
        text = path.read_text(encoding="utf-8")
        found = HEADING.findall(text) if kind == "section" else TABLE_ROW.findall(text)
        if number not in found:
            problems.append(f"docs/{page} has no {kind} {number}")
    return problems


def test_no_file_cites_a_path_outside_the_repository():
    texts = _texts()
    assert "README.md" in texts and "docs/math.md" in texts, sorted(texts)
    offenders = [line for name, text in texts.items() for line in _outside_references(name, text)]
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_every_docs_citation_names_an_existing_section_and_row():
    problems, count = [], 0
    for name, text in _texts().items():
        cited = _citations(text)
        count += len(cited)
        problems += [f"{name}: {problem}" for problem in _unresolved(cited, ROOT / "docs")]
    assert count > 0, "no citation of docs/ found: the scan is broken"
    assert not problems, "citations that do not resolve:\n" + "\n".join(sorted(set(problems)))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("`docs/math.md` §9 that is", [("math.md", "section", "9")]),
        ("(docs/math.md §3, §4, §6a)", [("math.md", "section", n) for n in ("3", "4", "6")]),
        ("(docs/math.md §3.1–3.3).", [("math.md", "section", "3.1"), ("math.md", "section", "3.3")]),
        ("(docs/math.md §3.4-1)", [("math.md", "section", "3.4")]),
        (
            "docs/math.md §9 rows 2 and 17",
            [("math.md", "section", "9"), ("math.md", "row", "2"), ("math.md", "row", "17")],
        ),
        ("| docs/math.md row 7 |", [("math.md", "row", "7")]),
        ("(docs/math.md A5)", [("math.md", "section", "A5")]),
        ("(CRATE's MSSA, §5 of docs/math.md)", [("math.md", "section", "5")]),
        (
            "rows 27 and 28 of docs/math.md §9",
            [("math.md", "section", "9"), ("math.md", "row", "27"), ("math.md", "row", "28")],
        ),
        ("rows 29–31 (`docs/crate-alpha.md` §3)", [("crate-alpha.md", "section", "3")]),
        ("docs/math.md: 132%", []),
    ],
)
def test_citation_forms_are_read(text, expected):
    assert sorted(_citations(text)) == sorted(expected)


def test_a_missing_page_section_or_row_is_reported(tmp_path):
    """Negative control for the resolution check, on a page written here."""
    (tmp_path / "page.md").write_text(
        "# Title\n\n## 1. One\n\n### 1.2 Sub\n\n| # | p |\n|---|---|\n| 4 | x |\n"
    )
    good = _citations("page: docs/page.md §1, §1.2 row 4")
    assert len(good) == 3 and not _unresolved(good, tmp_path)
    bad = _citations("docs/page.md §2, §1.3 row 5; docs/other.md §1")
    assert _unresolved(bad, tmp_path) == [
        "docs/page.md has no section 2",
        "docs/page.md has no section 1.3",
        "docs/page.md has no row 5",
        "docs/other.md does not exist",
    ]


@pytest.mark.parametrize(
    "text, outside",
    [
        ("see `../shared/spec/math.md` §9", True),
        ("math.md §7", True),
        ("(official-architecture.md)", True),
        ("official-architecture notes", True),
        ("performance.md", True),
        ("docs/math.md §7 and docs/architecture.md", False),
        ("docs/crate-alpha.md §2", False),
    ],
)
def test_outside_references_are_recognised(text, outside):
    assert bool(_outside_references("x", text)) == outside
