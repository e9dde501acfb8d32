"""MkDocs hook: fills the generated parts of the manual from the code itself (`<!-- peftkit:NAME
-->` markers: the recipe reference from the schema, the methods table from the registry), and
makes the home page the repository's README, its links pointed into the site."""

from __future__ import annotations

from pathlib import Path

from peftkit.recipe.reference import fill

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown: str, page, **_: object) -> str:
    if page.file.src_uri == "index.md":
        markdown = (
            README.read_text().replace("](docs/", "](").replace("(CHANGELOG.md)", "(changelog.md)")
        )
    return fill(markdown)
