"""The documents the code leans on: design-document references resolve, README imports and layout are current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
README = ROOT / "README.md"
SCANNED_DIRS = ("crd_fast", "csrc", "tests", "bench", "scripts", ".ci")
SCANNED_SUFFIXES = {".py", ".pyx", ".pxd", ".cpp", ".cu", ".cuh", ".h", ".sh", ".md", ".toml", ".txt", ".ini", ""}
# "docs/DESIGN.md", then optionally "#anchor", and optionally a quoted section name: docs/DESIGN.md ("Pipeline")
REFERENCE = re.compile(r'(?P<path>[\w./-]*DESIGN\.md)(?P<anchor>#[\w-]+)?(?:\)?,?\s*\(?\s*"(?P<section>[^"]+)")?')

pytestmark = pytest.mark.skipif(
    not (README.is_file() and (ROOT / "crd_fast").is_dir()), reason="needs the source checkout (README.md, crd_fast/)"
)


def _headings() -> list[str]:
    lines = DESIGN.read_text(encoding="utf-8").splitlines()
    return [line.lstrip("#").strip() for line in lines if line.startswith("#")]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _scanned_files() -> list[Path]:
    files = [README, ROOT / "CMakeLists.txt", ROOT / "pyproject.toml"]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SCANNED_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return [f for f in files if f.is_file() and f.resolve() != Path(__file__).resolve()]


def _references() -> list[tuple[Path, int, re.Match]]:
    found = []
    for path in _scanned_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            found.extend((path, lineno, m) for m in REFERENCE.finditer(line))
    return found


def test_design_document_exists_with_the_cited_core_sections():
    headings = _headings()
    for name in (
        "Method",
        "Pipeline",
        "Linearity",
        "Kernels and dispatch",
        "Model files",
        "Extending",
        "Layout",
        "Guarantees",
    ):
        assert name in headings, f"docs/DESIGN.md has no section {name!r}"
    assert len(headings) == len(set(headings)), "section names in docs/DESIGN.md must be unique (code cites them)"


def test_every_design_reference_resolves_inside_the_repository():
    refs = _references()
    assert len(refs) >= 5, "expected the code to cite docs/DESIGN.md (found almost no references: is the scan broken?)"
    headings = set(_headings())
    anchors = {_anchor(h) for h in headings}
    problems = []
    for path, lineno, m in refs:
        where = f"{path.relative_to(ROOT)}:{lineno}"
        ref = m.group("path")
        # Markdown files link relative to themselves; code cites paths from the repository root.
        base = path.parent if path.suffix == ".md" else ROOT
        if (base / ref).resolve() != DESIGN.resolve():
            problems.append(f"{where}: {ref!r} does not point to docs/DESIGN.md")
        if m.group("anchor") and m.group("anchor")[1:] not in anchors:
            problems.append(f"{where}: anchor {m.group('anchor')!r} is not a heading of docs/DESIGN.md")
        if m.group("section") and m.group("section") not in headings:
            problems.append(f"{where}: section {m.group('section')!r} is not a heading of docs/DESIGN.md")
    assert not problems, "\n".join(problems)


def test_readme_imports_work():
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in README.read_text(encoding="utf-8").splitlines()]
    imports = [line for line in lines if re.match(r"(from crd_fast(\.\w+)* import |import crd_fast)", line)]
    assert len(imports) >= 3, f"the README's import lines were not found: {imports}"
    out = subprocess.run(
        [sys.executable, "-c", "\n".join(imports)], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, f"README imports fail:\n{chr(10).join(imports)}\n{out.stderr[-3000:]}"


def test_the_layout_is_written_once_and_lists_every_package_folder():
    assert "## Layout" not in (ROOT / "README.md").read_text(encoding="utf-8"), "the layout lives in docs/DESIGN.md"
    document = "docs/DESIGN.md"
    text = (ROOT / document).read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.find("\n## ", 1) if "\n## " in layout[1:] else len(layout)]
    packages = sorted(p.name for p in (ROOT / "crd_fast").iterdir() if (p / "__init__.py").is_file())
    assert packages, "no subpackages found under crd_fast/"
    missing = [name for name in packages if f"crd_fast/{name}/" not in layout]
    assert not missing, f"the layout section of {document} does not list crd_fast/{missing}"


# bench/RESULTS.md is read by users: its headings carry no planning words, its contents links resolve, and every
# bench file a document or comment names (the commands behind the figures) exists at that path.
RESULTS = ROOT / "bench" / "RESULTS.md"
PLANNING_WORDS = re.compile(r"\b(issues?|targets?|sessions?|engineer'?s?|stop\w*)\b", re.IGNORECASE)
BENCH_FILE = re.compile(r"(?<![\w/.-])bench/[\w./*-]*\.(?:py|json|md|ini)\b")
# 'bench/RESULTS.md "Section"' or 'bench/RESULTS.md, "Section" and "Other"' (a name may wrap to the next line)
RESULTS_CITATION = re.compile(r'bench/RESULTS\.md,?\s*\(?\s*((?:"[^"]+"(?:,?\s*(?:and|or)?\s*)?)+)')
ABSOLUTE_MACHINE_PATH = re.compile(r"(?<![\w.-])/(?:work|root|home|tmp)\b")


def _markdown_headings(path: Path) -> list[str]:
    """The headings of a Markdown file, fenced code blocks skipped."""
    headings, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            headings.append(line.lstrip("#").strip())
    return headings


def _documents() -> list[Path]:
    return _scanned_files() + sorted((ROOT / "docs").rglob("*.md"))


def test_results_headings_carry_no_planning_words():
    headings = _markdown_headings(RESULTS)
    assert len(headings) >= 10, "bench/RESULTS.md has almost no headings: is the scan broken?"
    planning = [h for h in headings if PLANNING_WORDS.search(h)]
    assert not planning, f"bench/RESULTS.md headings with planning words: {planning}"


def test_results_contents_links_resolve():
    anchors = [_anchor(h) for h in _markdown_headings(RESULTS)]
    assert len(anchors) == len(set(anchors)), "two bench/RESULTS.md headings share an anchor"
    links = re.findall(r"\]\(#([^)\s]+)\)", RESULTS.read_text(encoding="utf-8"))
    assert len(links) >= 5, "bench/RESULTS.md has no table of contents"
    missing = [link for link in links if link not in anchors]
    assert not missing, f"bench/RESULTS.md links to headings it does not have: {missing}"


def test_cited_results_sections_exist():
    headings = _markdown_headings(RESULTS)
    problems, cited = [], 0
    for path in _documents():
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for m in RESULTS_CITATION.finditer(text):
            for name in re.findall(r'"([^"]+)"', m.group(1)):
                cited += 1
                if not any(h.startswith(name) for h in headings):
                    problems.append(f"{path.relative_to(ROOT)}: {name!r} begins no heading of bench/RESULTS.md")
    assert cited >= 3, "expected the code and docs to cite bench/RESULTS.md sections (is the scan broken?)"
    assert not problems, "\n".join(problems)


def test_cited_bench_files_exist():
    problems, cited = [], set()
    for path in _documents():
        for m in BENCH_FILE.finditer(path.read_text(encoding="utf-8", errors="replace")):
            cited.add(m.group(0))
            if not list(ROOT.glob(m.group(0))):
                problems.append(f"{path.relative_to(ROOT)}: {m.group(0)} does not exist")
    assert {"bench/RESULTS.md", "bench/suites/conftest.py"} <= cited, "the scan found no bench paths"
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_absolute_machine_paths_in_the_documents_and_benchmarks():
    files = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    suffixes = {".py", ".md", ".json", ".ini"}
    files += [p for p in sorted((ROOT / "bench").rglob("*")) if p.is_file() and p.suffix in suffixes]
    found = [
        f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}"
        for path in files
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if ABSOLUTE_MACHINE_PATH.search(line)
    ]
    assert not found, "absolute machine paths (describe them instead):\n" + "\n".join(found)
