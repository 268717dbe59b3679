"""One document builder for every page kernelatlas writes (the report, its kernel-quality section): blocks of
headings, paragraphs, lists, tables, figures and raw fragments, rendered to Markdown and to self-contained HTML."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Document"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
code { background: #f3f3f3; padding: 0 .2em; }
ul.contents { columns: 2; font-size: 0.9em; }
"""


class Document:
    """A document as blocks, rendered to Markdown and to one self-contained HTML page (figures as PNG files
    next to it, tables inline), or to an HTML fragment for another document's :meth:`raw`.  Inline `code`
    spans are the only markup in text."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", " ".join(text.split())))

    def ul(self, items: Iterable[str]) -> None:
        items = [" ".join(i.split()) for i in items]
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], csv: str | None = None,
              caption: str | None = None, bold_last: bool = False) -> None:
        self.blocks.append(("table", (list(headers), [list(r) for r in rows], csv, caption, bold_last)))

    def raw(self, markdown: str, html_fragment: str) -> None:
        """A section rendered elsewhere (the kernel-quality section), as Markdown and as an HTML fragment."""
        self.blocks.append(("raw", (markdown.strip(), html_fragment)))

    def figure(self, file: str, title: str, caption: str) -> None:
        """A PNG next to the pages: ``title`` is its alt text, ``caption`` how to read it."""
        self.blocks.append(("fig", (file, title, " ".join(caption.split()))))

    @staticmethod
    def _inline_html(text: str) -> str:
        parts = text.split("`")
        return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>"
                       for i, p in enumerate(parts))

    @staticmethod
    def _numeric_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[bool]:
        """Columns whose every cell is a number, a percentage or a dash: right-aligned."""
        number = re.compile(r"^(–|-?[\d,]+(\.\d+)?%?)$")
        return [bool(rows) and all(number.match(r[i].replace("**", "")) for r in rows) for i in range(len(headers))]

    @staticmethod
    def _md_cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def markdown(self) -> str:
        out: list[str] = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in value))
            elif kind == "table":
                headers, rows, csv, caption, bold_last = value
                lines = []
                if caption:
                    lines.append(f"*{caption}*" + (f" ([CSV]({csv}))" if csv else "") + "\n")
                elif csv:
                    lines.append(f"[CSV]({csv})\n")
                lines.append("| " + " | ".join(self._md_cell(h) for h in headers) + " |")
                numeric = self._numeric_columns(headers, rows)
                lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
                for r, row in enumerate(rows):
                    cells = [self._md_cell(c) for c in row]
                    if bold_last and r == len(rows) - 1:
                        cells = [f"**{c}**" if c else c for c in cells]
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
            elif kind == "fig":
                file, title, caption = value
                out.append(f"![{self._md_cell(title)}]({file})\n\n*{caption}*")
            elif kind == "raw":
                out.append(value[0])
        return "\n\n".join(out) + "\n"

    def html_fragment(self) -> str:
        """The blocks as HTML without the page around them (headings without anchors): for :meth:`raw`."""
        return "\n".join(self._html_body(anchors=False)[0]) + "\n"

    def html(self, title: str) -> str:
        """One self-contained page: a style, a table of contents of the h2 sections, the blocks."""
        body, contents = self._html_body(anchors=True)
        if contents and body:  # after the title and its first paragraph
            body.insert(min(2, len(body)), '<nav><ul class="contents">' + "".join(contents) + "</ul></nav>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
                f"</title>\n<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")

    def _html_body(self, *, anchors: bool) -> tuple[list[str], list[str]]:
        body: list[str] = []
        contents: list[str] = []
        for kind, value in self.blocks:
            if kind == "h":
                level, text = value
                if not anchors:
                    body.append(f"<h{level}>{html.escape(text)}</h{level}>")
                    continue
                anchor = f"s{len(body)}-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
                body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
                if level == 2:
                    contents.append(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>')
            elif kind == "p":
                body.append(f"<p>{self._inline_html(value)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{self._inline_html(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                headers, rows, csv, caption, bold_last = value
                cap = ""
                if caption or csv:
                    cap = "<caption>" + (self._inline_html(caption) if caption else "") + \
                        (f' (<a href="{html.escape(csv)}">CSV</a>)' if csv else "") + "</caption>"
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                numeric = self._numeric_columns(headers, rows)
                trs = []
                for r, row in enumerate(rows):
                    cls = ' class="total"' if bold_last and r == len(rows) - 1 else ""
                    tds = "".join(f'<td{" class=num" if numeric[i] else ""}>{html.escape(c)}</td>'
                                  for i, c in enumerate(row))
                    trs.append(f"<tr{cls}>{tds}</tr>")
                body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>")
            elif kind == "raw":
                fragment = value[1]
                for m in list(re.finditer(r"<h2>(.*?)</h2>", fragment)):  # give its sections anchors too
                    anchor = f"s{len(body)}-" + re.sub(r"[^a-z0-9]+", "-", html.unescape(m.group(1)).lower()).strip("-")
                    fragment = fragment.replace(m.group(0), f'<h2 id="{anchor}">{m.group(1)}</h2>', 1)
                    contents.append(f'<li><a href="#{anchor}">{m.group(1)}</a></li>')
                body.append(fragment)
            elif kind == "fig":
                file, title, caption = value
                body.append(f'<figure><a href="{html.escape(file)}"><img src="{html.escape(file)}" '
                            f'alt="{html.escape(title)}"></a>'
                            f"<figcaption>{self._inline_html(caption)}</figcaption></figure>")
        return body, contents
