"""Text from uploaded files: .txt, .md (as is), .html (block structure kept as paragraphs and
markdown headings), .pdf (pypdf, page by page). Failures raise RagError(400) naming the file."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import PurePath

from service.rag.errors import RagError

SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
_BLOCK = {"p", "div", "section", "article", "li", "ul", "ol", "table", "tr", "br", "pre", "blockquote",
          "header", "footer", "main", "nav", "aside", "dd", "dt", "figure", "hr"}
_SKIP = {"script", "style", "noscript", "template", "head", "svg"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in _BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    lines = [ln.strip() for ln in "".join(p.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def pdf_to_text(data: bytes, filename: str) -> str:
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise RagError(400, f"{filename}: the PDF is encrypted", param="file", code="unparseable_file")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except RagError:
        raise
    except Exception as exc:  # pypdf raises many kinds on damaged files
        raise RagError(400, f"{filename}: could not parse the PDF ({type(exc).__name__}: {exc})",
                       param="file", code="unparseable_file") from None
    return "\n\n".join(p for p in pages if p)


def extract_text(filename: str, data: bytes, content_type: str | None = None) -> str:
    suffix = PurePath(filename).suffix.lower()
    if suffix not in SUPPORTED:
        if content_type == "application/pdf":
            suffix = ".pdf"
        elif content_type in ("text/html",):
            suffix = ".html"
        elif content_type in ("text/plain", "text/markdown"):
            suffix = ".txt"
        else:
            raise RagError(400, f"{filename}: unsupported file type; upload one of {', '.join(SUPPORTED)}",
                           param="file", code="unsupported_file_type")
    if suffix == ".pdf":
        text = pdf_to_text(data, filename)
    else:
        try:
            raw = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise RagError(400, f"{filename}: not valid UTF-8 text", param="file", code="unparseable_file") from None
        text = html_to_text(raw) if suffix in (".html", ".htm") else raw
    if not text.strip():
        raise RagError(400, f"{filename}: no text could be extracted", param="file", code="empty_document")
    return text
