"""The code cites docs/reference.md by section; every cited section exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _anchors() -> set[str]:
    text = (REPO / "docs" / "reference.md").read_text()
    headings = re.findall(r"^#{2,4} (.+)$", text, flags=re.M)
    # GitHub's slugs: lower case, punctuation dropped, spaces to hyphens.
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_cited_reference_section_exists() -> None:
    anchors = _anchors()
    missing = []
    for path in [*REPO.joinpath("scanqueue").rglob("*"), *REPO.joinpath("tests").rglob("*.py")]:
        if path.suffix not in (".py", ".js", ".html"):
            continue
        for anchor in re.findall(r"docs/reference\.md#([a-z0-9-]+)", path.read_text()):
            if anchor not in anchors:
                missing.append(f"{path.relative_to(REPO)}: #{anchor}")
    assert not missing, missing


def test_no_code_cites_the_contract_outside_the_repo() -> None:
    cites = [
        str(p.relative_to(REPO))
        for p in REPO.joinpath("scanqueue").rglob("*")
        if p.suffix in (".py", ".js", ".html") and "CONTRACT" in p.read_text()
    ]
    assert not cites, cites
