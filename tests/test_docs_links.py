"""Every relative link in the README and docs/*.md points to a file of the repository, and every
``#anchor`` to a heading or an ``<a id>`` of its target page (GitHub's heading slugs)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "preregistered").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a '# comment' there is no heading, a '[x](y)' no link)."""
    return FENCE.sub("", page.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = _prose(page)
    out = set(re.findall(r"<a id=\"([^\"]+)\"", text))
    seen = {}
    for h in re.findall(r"^#{1,6} (.+)$", text, re.M):
        s = _slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_matches_github():
    assert _slug("Outcome of the PFENet confirmation (rule 3), and the runs") == \
        "outcome-of-the-pfenet-confirmation-rule-3-and-the-runs"
    assert _slug('<a id="x"></a>The `DCMSpec` — one spec') == "the-dcmspec--one-spec"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading or <a id> '{anchor}' in {dest.name}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)
