"""The report as one document written twice: ``report.md`` and a self-contained
``report.html`` (figures embedded as data URIs: it opens anywhere, offline).

The content is a list of blocks (headings, paragraphs, bullet lists, tables, figures)
built once; each renderer only formats it, so the two pages cannot drift apart.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cluster.atomic import atomic_write_text


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame  # already formatted: every cell a string
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


Block = Heading | Paragraph | Bullets | Table | Figure


def to_markdown(title: str, blocks: list[Block], folder: Path) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Bullets):
            lines += [*(f"- {item}" for item in block.items), ""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [block.caption, ""]
            lines += [*_markdown_table(block.frame), ""]
        else:
            relative = block.path.relative_to(folder).as_posix()
            lines += [f"![{block.caption}]({relative})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    header = [str(c) for c in frame.columns]
    rows = [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0 1.4em; font-size: .86em; }
th, td { border: 1px solid #ddd; padding: .25em .55em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.caption { color: #555; font-size: .9em; margin-bottom: 0; }
"""


def to_html(title: str, blocks: list[Block]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items)
                         + "</ul>")
        elif isinstance(block, Table):
            if block.caption:
                parts.append(f'<p class="caption">{_inline(block.caption)}</p>')
            parts.append(_html_table(block.frame))
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(block.caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>'
                         f"{_inline(block.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML; everything else escaped."""
    escaped = html.escape(text)
    out, code, bold = [], False, False
    i = 0
    while i < len(escaped):
        if escaped.startswith("**", i):
            out.append("</strong>" if bold else "<strong>")
            bold, i = not bold, i + 2
        elif escaped[i] == "`":
            out.append("</code>" if code else "<code>")
            code, i = not code, i + 1
        else:
            out.append(escaped[i])
            i += 1
    return "".join(out)


def write_pages(folder: Path, title: str, blocks: list[Block]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in ``folder`` (figures already there)."""
    markdown = atomic_write_text(folder / "report.md", to_markdown(title, blocks, folder))
    page = atomic_write_text(folder / "report.html", to_html(title, blocks))
    return markdown, page
