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


@pytest.mark.parametrize("document", ["README.md", "docs/DESIGN.md"])
def test_layout_sections_list_every_package_folder(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.find("\n## ", 1) if "\n## " in layout[1:] else len(layout)]
    packages = sorted(p.name for p in (ROOT / "crd_fast").iterdir() if (p / "__init__.py").is_file())
    assert packages, "no subpackages found under crd_fast/"
    missing = [name for name in packages if f"crd_fast/{name}/" not in layout]
    assert not missing, f"the layout section of {document} does not list crd_fast/{missing}"
