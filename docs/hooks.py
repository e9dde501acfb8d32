"""MkDocs hook: fills the generated parts of the manual (`<!-- peftkit:NAME -->` markers) from
the code itself: the recipe reference from the schema, the methods table from the registry."""

from __future__ import annotations

from peftkit.recipe.reference import fill


def on_page_markdown(markdown: str, **_: object) -> str:
    return fill(markdown)
