"""A small document model (headings, paragraphs, lists, tables) and its Markdown and HTML renderings.

Tables carry a key: Markdown marks them with `<!-- table: KEY -->`, HTML with `id="KEY"`, so a program (the
negotiation test) can find the presentation-context tables again and read them back.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    key: str
    caption: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


Block = Heading | Para | Bullets | Table


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)
    _tables: int = 0

    def h(self, level: int, text: str) -> None:
        self.blocks.append(Heading(level, text))

    def p(self, text: str) -> None:
        self.blocks.append(Para(text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(Bullets(items))

    def table(self, key: str, caption: str, header: list[str], rows: list[list[str]]) -> str:
        """Add a numbered table; returns its label ("Table 7") for references in the text."""
        self._tables += 1
        label = f"Table {self._tables}"
        self.blocks.append(Table(key, f"{label}: {caption}", header, rows))
        return label


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            out += [f"{'#' * (block.level + 1)} {block.text}", ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        else:
            out += [f"<!-- table: {block.key} -->", f"**{block.caption}**", "",
                    "| " + " | ".join(_md_cell(h) for h in block.header) + " |",
                    "|" + "---|" * len(block.header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the Markdown marks the text uses: `code`, **bold** and *italics*."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", text)


_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.4}"
          "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #999;padding:2px 6px;"
          "vertical-align:top;text-align:left}caption{font-weight:bold;text-align:left;padding:4px 0}"
          "code{font-size:90%}")


def html_document(doc: Document) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8"/>',
           f"<title>{html.escape(doc.title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
           f"<h1>{html.escape(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            level = min(block.level + 1, 6)
            out.append(f"<h{level}>{_inline(block.text)}</h{level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            out += ["<ul>", *(f"<li>{_inline(item)}</li>" for item in block.items), "</ul>"]
        else:
            out += [f'<table id="{html.escape(block.key)}">', f"<caption>{_inline(block.caption)}</caption>",
                    "<thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header) + "</tr></thead>",
                    "<tbody>"]
            out += ["<tr>" + "".join(f"<td>{_inline(c).replace(chr(10), '<br/>')}</td>" for c in row) + "</tr>"
                    for row in block.rows]
            out += ["</tbody>", "</table>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def read_markdown_table(text: str, key: str) -> list[dict[str, str]]:
    """The rows of the table marked `key` in a rendered Markdown statement, as {header: cell}."""
    lines = text.splitlines()
    start = lines.index(f"<!-- table: {key} -->")
    header_line = lines[start + 3]

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|").replace("<br>", "\n") for p in parts]

    header = cells(header_line)
    rows = []
    for line in lines[start + 5:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line), strict=True)))
    return rows
