"""The document model of a report: blocks (headings, paragraphs, bullets, tables, figures) built once and
rendered to markdown and to a self-contained HTML page."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (row, column) cells shown in bold
    note: str = ""


@dataclass(frozen=True)
class FigureBlock:
    path: Path  # the PNG on disk; markdown links it, html embeds it
    caption: str


Block = Heading | Paragraph | Bullets | Table | FigureBlock


# ----- markdown ---------------------------------------------------------------------------------------------------
def markdown(blocks: Sequence[Block], root: Path) -> str:
    """Markdown of the blocks; figures are linked relative to ``root`` (the report's folder)."""
    parts = []
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"{'#' * level} {text}")
            case Paragraph(text):
                parts.append(text)
            case Bullets(items):
                parts.append("\n".join(f"- {item}" for item in items))
            case Table():
                parts.append(markdown_table(block))
            case FigureBlock(path, caption):
                parts.append(f"![{path.stem}]({path.relative_to(root).as_posix()})\n\n*{caption}*")
    return "\n\n".join(parts) + "\n"


def markdown_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold else text

    lines = ["| " + " | ".join(cell(h, False) for h in table.header) + " |",
             "|" + "|".join("---" for _ in table.header) + "|"]
    lines += ["| " + " | ".join(cell(text, (i, j) in table.bold) for j, text in enumerate(row)) + " |"
              for i, row in enumerate(table.rows)]
    return "\n".join(lines) + (f"\n\n{table.note}" if table.note else "")


# ----- html -------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.78rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.3rem; text-align: left; }
th { background: #f3f3f3; }
p.note, figcaption { color: #555; font-size: 0.85rem; }
figure { margin: 1rem 0; }
img { max-width: 100%; }
"""


def html_page(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page of the blocks: inline CSS, figures embedded as base64 PNG, all text escaped."""
    esc = html.escape
    body = []
    for block in blocks:
        match block:
            case Heading(text, level):
                body.append(f"<h{level}>{esc(text)}</h{level}>")
            case Paragraph(text):
                body.append(f"<p>{esc(text)}</p>")
            case Bullets(items):
                body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")
            case Table():
                body.append(html_table(block))
            case FigureBlock(path, caption):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(path.stem)}">'
                            f"<figcaption>{esc(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _cell_text(text: str) -> str:
    """Escaped, with a line-break opportunity after each underscore (``balanced_accuracy`` is one long word), so
    that wide tables fit an 800 px page (tests/test_report_browser.py)."""
    return html.escape(text).replace("_", "_<wbr>")


def html_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        return f"<td><strong>{_cell_text(text)}</strong></td>" if bold else f"<td>{_cell_text(text)}</td>"

    head = "<tr>" + "".join(f"<th>{_cell_text(h)}</th>" for h in table.header) + "</tr>"
    rows = ["<tr>" + "".join(cell(text, (i, j) in table.bold) for j, text in enumerate(row)) + "</tr>"
            for i, row in enumerate(table.rows)]
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{note}"
