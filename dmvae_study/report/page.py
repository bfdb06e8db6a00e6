"""The report page, written once as sections and rendered twice: `report.md` and `report.html`.

Text is inline Markdown limited to what both renderers understand: `code`, **bold**, [text](href).
Image sources are paths relative to the report folder, so the folder can be moved or zipped whole.
"""

from __future__ import annotations

import html
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dmvae_study.report.tables import markdown_table

MISSING = "–"  # a missing table value, in both renderings


@dataclass
class Image:
    src: str  # relative to the report folder
    alt: str
    caption: str = ""


@dataclass
class Para:
    text: str
    callout: bool = False  # a warning: a quoted block in Markdown, a framed box in HTML


@dataclass
class Table:
    frame: pd.DataFrame


@dataclass
class Figures:
    images: list[Image]
    side_by_side: bool = False  # one line of images with captions (the sample / reconstruction grids)


@dataclass
class Bullets:
    items: list[str]


Part = Para | Table | Figures | Bullets


@dataclass
class Section:
    title: str  # "" for the lines under the page title
    parts: list[Part] = field(default_factory=list)
    level: int = 2


# ---- Markdown ------------------------------------------------------------------------------------
def _md_part(part: Part) -> list[str]:
    if isinstance(part, Para):
        return [f"> {part.text}" if part.callout else part.text]
    if isinstance(part, Table):
        return [markdown_table(part.frame)]
    if isinstance(part, Bullets):
        return ["\n".join(f"- {item}" for item in part.items)]
    if part.side_by_side:
        head = "| " + " | ".join(im.caption or im.alt for im in part.images) + " |"
        cells = "| " + " | ".join(f"![{im.alt}]({im.src})" for im in part.images) + " |"
        return ["\n".join([head, "|" + ":-:|" * len(part.images), cells])]
    return [f"![{im.alt}]({im.src})" + (f"\n\n{im.caption}" if im.caption else "") for im in part.images]


def render_markdown(title: str, sections: list[Section]) -> str:
    blocks = [f"# {title}"]
    for s in sections:
        blocks += [f"{'#' * s.level} {s.title}"] if s.title else []
        blocks += [b for part in s.parts for b in _md_part(part)]
    return "\n\n".join(blocks) + "\n"


# ---- HTML ----------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
table { border-collapse: collapse; margin: .5em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } th { background: #f6f6f6; } td.num { text-align: right; }
.callout { border-left: 4px solid #d9822b; background: #fff6ec; padding: .5em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
.side { display: flex; flex-wrap: wrap; gap: 1.5em; } .side img { image-rendering: pixelated; width: 272px; }
figcaption { font-size: 13px; color: #555; }
""".strip()
_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>')]


def inline_html(text: str) -> str:
    """Escape `text`, then turn its inline Markdown (`code`, **bold**, [text](href)) into tags."""
    out = html.escape(text, quote=False)
    for pattern, tag in _INLINE:
        out = pattern.sub(tag, out)
    return out


def cell_text(v: Any) -> str:
    """A table value as text: 3 significant digits for reals, `MISSING` for None and NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return MISSING
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return f"{float(v):.3g}"
    return str(v)


def _td(v: Any) -> str:
    numeric = isinstance(v, numbers.Real) and not isinstance(v, bool)
    return f"<td{' class=num' if numeric else ''}>{html.escape(cell_text(v))}</td>"


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(_td(v) for v in rec) + "</tr>" for rec in df.astype(object).itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(im: Image) -> str:
    tag = f'<img src="{html.escape(im.src)}" alt="{html.escape(im.alt)}" loading="eager">'
    caption = f"<figcaption>{inline_html(im.caption)}</figcaption>" if im.caption else ""
    return f"<figure>{tag}{caption}</figure>"


def _html_part(part: Part) -> str:
    if isinstance(part, Para):
        return f"<p{' class=callout' if part.callout else ''}>{inline_html(part.text)}</p>"
    if isinstance(part, Table):
        return html_table(part.frame)
    if isinstance(part, Bullets):
        return "<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in part.items) + "</ul>"
    figures = "".join(_img(im) for im in part.images)
    return f'<div class="side">{figures}</div>' if part.side_by_side else figures


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained page (inline CSS, no script, images by relative path)."""
    body = [f"<h1>{inline_html(title)}</h1>"]
    for s in sections:
        body += [f"<h{s.level}>{inline_html(s.title)}</h{s.level}>"] if s.title else []
        body += [_html_part(part) for part in s.parts]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
