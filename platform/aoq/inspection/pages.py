"""HTML pages from the templates in ``aoq/inspection/templates/`` (Jinja2, autoescaped)."""

from __future__ import annotations

from functools import lru_cache

import jinja2


@lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    """The template environment: every value is HTML-escaped unless marked safe, and a
    name missing from the context is an error, not an empty string."""
    return jinja2.Environment(loader=jinja2.PackageLoader("aoq.inspection", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def search_page(*, title: str, model: str, split: str, n_images: int, max_chars: int,
                default_k: int = 10, max_k: int = 100) -> str:
    """The served search page: a text box whose queries go to ``api/search`` and whose
    results show the pictures from ``api/images/<i>.png``."""
    return templates().get_template("search.html.j2").render(
        title=title, model=model, split=split, n_images=n_images, max_chars=max_chars,
        default_k=default_k, max_k=max_k)
