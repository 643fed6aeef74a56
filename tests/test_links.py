"""Every link into the course's docs lands somewhere: `docs/<page>.md#<anchor>` in the notebooks, helpers' messages,
README, CONTRIBUTING and the docs themselves names a page that exists and an anchor it defines as `<a id="…">`
(the form GitHub renders; a `{#…}` heading attribute is shown as text there)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?:\.\./)?docs/([a-z_]+\.md)#([A-Za-z0-9_-]+)")
SOURCES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "helpers").glob("*.py"))]
LINKS = sorted({(m.group(1), m.group(2), src.relative_to(ROOT).as_posix())
                for src in SOURCES for m in LINK.finditer(src.read_text())})


def anchors(page: str) -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"', (ROOT / "docs" / page).read_text()))


def test_links_are_found():
    assert len(LINKS) >= 10 and {page for page, _, _ in LINKS} >= {"sources.md", "appendix.md"}, LINKS


@pytest.mark.parametrize(("page", "anchor", "source"), LINKS, ids=[f"{s}->{p}#{a}" for p, a, s in LINKS])
def test_link_target_exists(page, anchor, source):
    assert (ROOT / "docs" / page).is_file(), f"{source} links to docs/{page}, which does not exist"
    assert anchor in anchors(page), f"{source} links to docs/{page}#{anchor}: no <a id=\"{anchor}\"> there"
