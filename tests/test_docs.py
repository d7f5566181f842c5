"""The contracts live in docs/: every page the code and READMEs cite exists, and no citation points elsewhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".yaml", ".js", ".html", ".toml")) or n == "Makefile"]


def test_every_cited_contract_page_exists_and_no_spec_citation_is_left():
    cited, stale = set(), []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        cited |= set(re.findall(r"docs/([a-z-]+\.md)", text))
        if re.search(r"SPEC\s*§|SPEC\.md", text):
            stale.append(path.relative_to(ROOT))
    assert {"geometry.md", "tours.md", "http-api.md", "bulk-specs.md"} <= cited
    assert sorted(p for p in cited if not (ROOT / "docs" / p).is_file()) == []
    assert stale == []
    for page in (ROOT / "docs").glob("*.md"):  # links between the pages resolve too
        for link in re.findall(r"\]\(([a-z-]+\.md)\)", page.read_text()):
            assert (ROOT / "docs" / link).is_file(), (page.name, link)
