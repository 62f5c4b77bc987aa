"""The docs name what exists: every module of our packages is on the architecture map, and every
test and benchmark a doc cites is a file in the repository.

A map that leaves modules out, or a doc that cites a file since renamed, sends a reader looking
for code that is not there; this keeps both honest as the code moves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = sorted(init.parent for root in ("sdk", "exporter", "server_stub")
                  for init in (REPO / root).glob("*/__init__.py"))
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


def _code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def _modules(package: Path) -> list[str]:
    """Module paths relative to the package (``model/bundle.py``); ``__init__`` and ``__main__``
    files are the package's door and entry point, described with the package itself."""
    return sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))


def test_the_three_packages_are_found():
    names = {p.name for p in PACKAGES}
    assert {"splitllm", "splitllm_export", "splitllm_server"} <= names


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_module_is_on_the_architecture_map(package: Path):
    spans = _code_spans((REPO / "docs" / "architecture.md").read_text())
    missing = [rel for rel in _modules(package)
               if not any(span == rel or span.endswith("/" + rel) for span in spans)]
    assert not missing, f"docs/architecture.md does not name these modules of {package.name}: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_the_docs_cite_exist(doc: Path):
    cited = set(re.findall(r"\b((?:tests|benchmarks|examples|deploy)/[\w./-]+\.(?:py|sh|cfg|md))", doc.read_text()))
    missing = sorted(path for path in cited if not (REPO / path).is_file())
    assert not missing, f"{doc.name} cites files that do not exist: {missing}"
