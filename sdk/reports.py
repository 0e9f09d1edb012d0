"""Generated docs: tables that commands write into docs pages between marker lines."""

from __future__ import annotations

import os
from pathlib import Path


def write_marked(path: str | os.PathLike, begin: str, end: str, body: str) -> Path:
    """Write a generated table into a docs page: between the `begin`/`end` marker lines where the
    page has them (the rest of the page is kept), else as the whole file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"
    else:
        text = body
    path.write_text(text, encoding="utf-8")
    return path
