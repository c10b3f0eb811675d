"""The documentation: every relative link and image resolves, the README stays short and in order, CITATION.cff
is valid."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_LIMIT = 12 * 1024  # bytes
DOCUMENTS = sorted([README, *(REPO / "docs").glob("*.md")])
# the README's sections, in order: a pattern for each heading (level 1 or 2)
README_SECTIONS = (
    ("title", r"# snapkv"),
    ("quick start", r"## Quick start"),
    ("notebooks in JupyterLab", r"## Open the notebooks"),
    ("Python API", r"## In Python"),
    ("policies", r"## Policies"),
    ("notebooks", r"## Notebooks"),
    ("results", r"## Results"),
    ("models and limits", r"## (Supported )?[Mm]odels and limits"),
    ("development", r"## Development"),
    ("citation and license", r"## Citation and license"),
)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def relative_targets(text: str) -> list[str]:
    """The relative targets of a markdown text's inline links and images (`[..](path)`, `![..](path)`), without
    their #fragment; code blocks and inline code are skipped, as are URLs, mailto: and same-page #anchors."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in INLINE_LINK.findall(text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(document: Path) -> list[str]:
    return [target for target in relative_targets(document.read_text(encoding="utf-8"))
            if not (document.parent / target).exists()]


def headings(text: str) -> list[str]:
    return [line.rstrip() for line in FENCE.sub("", text).splitlines() if re.match(r"#{1,2} ", line)]


def missing_or_out_of_order(text: str) -> list[str]:
    """Names of README_SECTIONS not found after the previous one's heading."""
    found, position, problems = headings(text), 0, []
    for name, pattern in README_SECTIONS:
        index = next((i for i in range(position, len(found)) if re.fullmatch(pattern, found[i])), None)
        if index is None:
            problems.append(name)
        else:
            position = index + 1
    return problems


# -- the checks themselves can fail ---------------------------------------------------------------------------
def test_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#part) ![ok](docs/a.png) [web](https://example.com/x) [top](#top) `[no](code.md)`\n"
                    "[broken](missing.md) ![broken image](docs/missing.png \"title\")\n"
                    "```\n[in a code block](also-missing.md)\n```\n")
    assert broken_links(page) == ["missing.md", "docs/missing.png"]


def test_order_check_finds_a_missing_or_moved_section():
    ordered = "\n".join(f"{pattern.replace('(Supported )?[Mm]', 'M')}\ntext" for _, pattern in README_SECTIONS)
    assert missing_or_out_of_order(ordered) == []
    moved = ordered.replace("## Policies\n", "").replace("## Citation", "## Policies\n## Citation")
    assert missing_or_out_of_order(moved) == ["notebooks", "results", "models and limits", "development"]
    assert missing_or_out_of_order(ordered.replace("## Results", "## Findings")) == ["results"]


# -- the repository's documents -------------------------------------------------------------------------------
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_resolve(document):
    assert relative_targets(document.read_text(encoding="utf-8")) or document != README, "README links nothing"
    assert broken_links(document) == [], f"{document.relative_to(REPO)} links files that do not exist"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (details go to docs/)"


def test_readme_sections_in_order():
    assert missing_or_out_of_order(README.read_text(encoding="utf-8")) == []


def test_readme_first_screen_shows_the_two_commands_and_python():
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:40])
    for text in ("python3 tasks.py reproduce", "python3 tasks.py test", "```python", "import snapkv"):
        assert text in first_screen, f"{text!r} is not in the README's first 40 lines"


def test_citation_file():
    yaml = pytest.importorskip("yaml", reason="pyyaml (the dev extra) is needed to parse CITATION.cff")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert citation.get(key), f"CITATION.cff has no {key}"
    snapkv_papers = [reference for reference in citation.get("references", [])
                     if "SnapKV" in reference.get("title", "")]
    assert snapkv_papers, "CITATION.cff has no reference to the SnapKV paper"
    assert snapkv_papers[0]["authors"][0]["family-names"] == "Li"
    assert "2404.14469" in str(snapkv_papers[0])
