"""The start tags of an HTML page, for tests that check what a report draws."""

from __future__ import annotations

from html.parser import HTMLParser


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def start_tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    """``(tag, attributes)`` of every start tag of ``page``, in order."""
    parser = _Collect()
    parser.feed(page)
    parser.close()
    return parser.tags
