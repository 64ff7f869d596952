"""Document bytes to plain text (HTML, plain text, Markdown, PDF), fingerprints and chunks for embedding.

`extract` is blocking (trafilatura and pypdf parse in Python): call it through
asyncio.to_thread. Both libraries are imported inside it, never at module import, so a
daemon that ingests nothing never pays for them in memory.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Final

from mongarsd.errors import ValidationError
from mongarsd.sanitize import clean_text

CHUNK_CHARS: Final = 800  # about 160-200 tokens: under the embedder's 256-token window
MIN_CHUNK_CHARS: Final = 50
MAX_TEXT_CHARS: Final = 2_000_000  # extracted text of one document
MAX_CHUNKS: Final = 2000  # chunks (memories) of one document
MAX_PDF_PAGES: Final = 2000
MAX_TITLE_CHARS: Final = 300
META_SNIFF_BYTES: Final = 4096  # where an HTML <meta charset> must appear (HTML spec: first 1024, leniently more)

HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
PLAIN_TYPES: Final = frozenset({"text/plain"})
MARKDOWN_TYPES: Final = frozenset({"text/markdown", "text/x-markdown"})
PDF_TYPES: Final = frozenset({"application/pdf"})
SUPPORTED_TYPES: Final = HTML_TYPES | PLAIN_TYPES | MARKDOWN_TYPES | PDF_TYPES

# Elements whose text is never page content, for the plain fallback dump.
_SKIP_TAGS: Final = frozenset({"script", "style", "noscript", "template", "head", "svg", "iframe", "object"})
_BLOCK_TAGS: Final = frozenset(
    {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6",
     "pre", "blockquote", "dd", "dt", "hr", "main", "nav", "aside", "figure", "figcaption"}
)  # fmt: skip
_META_CHARSET_RE = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)
_HSPACE_RE = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_NEWLINES_RE = re.compile(r"\n{3,}")
_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?;:。！？])\s+")
_MD_HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Extracted:
    title: str
    text: str
    content_type: str


# ------------------------------------------------------------------------------ pure helpers


def media_type(content_type: str) -> tuple[str, str | None]:
    """Split a Content-Type into its lower-case media type and its charset parameter, if any (pure)."""
    head, _, params = content_type.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip("\"'"):
            charset = value.strip().strip("\"'")
    return head.strip().lower(), charset


def normalise_text(text: str) -> str:
    """Tidy whitespace: spaces collapsed within lines, at most one blank line between paragraphs (pure)."""
    text = clean_text(text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    lines = [_HSPACE_RE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES_RE.sub("\n\n", "\n".join(lines)).strip()


def fingerprint(text: str) -> str:
    """Return the sha256 hex digest of the text, Unicode NFC and whitespace-normalised (pure).

    Two copies of a document that differ only in line wrapping, indentation or spacing get
    the same fingerprint, so re-ingesting a re-wrapped file is a duplicate.
    """
    canon = " ".join(unicodedata.normalize("NFC", text).split())
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


def _hard_split(text: str, max_chars: int) -> list[str]:
    """Cut an over-long sentence at the last space before the limit (mid-word only when there is none)."""
    out: list[str] = []
    rest = text.strip()
    while len(rest) > max_chars:
        cut = rest.rfind(" ", max_chars // 2, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        out.append(rest)
    return out


def _pieces(paragraph: str, max_chars: int) -> list[tuple[str, str]]:
    """Split one paragraph into (separator, piece) no longer than max_chars: at line ends, then sentence ends, then spaces."""
    if len(paragraph) <= max_chars:
        return [("\n\n", paragraph)]
    out: list[tuple[str, str]] = []
    sep = "\n\n"
    for raw_line in paragraph.split("\n"):
        line = raw_line.strip()
        if not line:
            continue
        for sentence in _SENTENCE_END_RE.split(line) if len(line) > max_chars else [line]:
            for piece in _hard_split(sentence, max_chars):
                out.append((sep, piece))
                sep = " "
        sep = "\n"
    return out


def chunk_text(text: str, *, max_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> list[str]:
    """Split text into chunks of at most max_chars, packing whole paragraphs, then lines, sentences, words (pure).

    Raises ValidationError when the text is empty or would make more than max_chunks chunks.
    """
    if max_chars < MIN_CHUNK_CHARS:
        raise ValidationError(f"chunk size must be at least {MIN_CHUNK_CHARS} characters, got {max_chars}", param="max_chars")
    chunks: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_RE.split(text):
        for sep, piece in _pieces(paragraph.strip(), max_chars) if paragraph.strip() else ():
            if not current:
                current = piece
            elif len(current) + len(sep) + len(piece) <= max_chars:
                current += sep + piece
            else:
                chunks.append(current)
                current = piece
                if len(chunks) > max_chunks:
                    raise _too_many_chunks(max_chunks, max_chars)
    if current:
        chunks.append(current)
    if not chunks:
        raise ValidationError("the document has no text to store", param="text")
    if len(chunks) > max_chunks:
        raise _too_many_chunks(max_chunks, max_chars)
    return chunks


def _too_many_chunks(max_chunks: int, max_chars: int) -> ValidationError:
    return ValidationError(
        f"the document is too long: it splits into more than {max_chunks} chunks of {max_chars} characters; "
        "split it into smaller documents",
        param="text",
    )


def decode_text(body: bytes, charset: str | None, *, what: str = "the document") -> str:
    """Decode bytes with the declared charset, else UTF-8 (BOM allowed); ValidationError naming both when neither fits (pure)."""
    tried: list[str] = []
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return body.decode("utf-16")
        except UnicodeDecodeError:
            tried.append("utf-16")
    if charset:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            tried.append(f"{charset} (an unknown charset)")
        else:
            try:
                return body.decode("utf-8-sig" if codec == "utf-8" else codec)
            except UnicodeDecodeError as err:
                tried.append(f"{charset} (bad byte at offset {err.start})")
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        tried.append(f"utf-8 (bad byte at offset {err.start})")
    raise ValidationError(f"{what} is not readable text: tried " + ", ".join(tried) + "; give its charset", param="body")


def _too_long(chars: int) -> ValidationError:
    return ValidationError(
        f"the document's text is too long ({chars} characters; at most {MAX_TEXT_CHARS}); split it into smaller documents",
        param="body",
    )


def _short_title(title: str) -> str:
    title = " ".join(title.split())
    return title if len(title) <= MAX_TITLE_CHARS else title[: MAX_TITLE_CHARS - 1].rstrip() + "…"


# ------------------------------------------------------------------------------ HTML


class _TextDump(HTMLParser):
    """The plain fallback: every visible text node, block elements on their own lines, and the <title>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip:
            self.parts.append(data)


def _html_dump(html: str) -> tuple[str, str]:
    """Return (title, visible text) with the standard library parser (blocking: CPU-bound)."""
    parser = _TextDump()
    parser.feed(html)
    parser.close()
    return " ".join("".join(parser.title_parts).split()), "".join(parser.parts)


def _decode_html(body: bytes, charset: str | None) -> str:
    if not charset:
        found = _META_CHARSET_RE.search(body[:META_SNIFF_BYTES])
        charset = found.group(1).decode("ascii") if found else None
    return decode_text(body, charset, what="the HTML page")


def _extract_html(body: bytes, charset: str | None, url: str) -> tuple[str, str]:
    """Main text and title of an HTML page via trafilatura, else a plain text dump (blocking)."""
    import trafilatura  # lazily: about 40 MB of parsers the daemon does not need until it ingests

    html = _decode_html(body, charset)
    title, dump = _html_dump(html)
    text = ""
    # No metadata pass and no fallback extractors: both run long regular expressions that hold
    # the GIL for tens of milliseconds on a large page, which the event loop would feel.
    doc: Any = trafilatura.bare_extraction(
        html,
        url=url or None,
        with_metadata=False,
        fast=True,
        include_comments=False,
        include_tables=True,
        include_images=False,
        deduplicate=False,
    )
    if doc is not None:
        text = str(getattr(doc, "text", None) or "")
    if not text.strip():
        # Short or unusual pages (a bare list, a page of links) fall under trafilatura's
        # minimum-size heuristics; their visible text is still the best we have.
        text = dump
    return title, text


# ------------------------------------------------------------------------------ PDF


def _extract_pdf(body: bytes) -> tuple[str, str]:
    """Text layer and title of a PDF via pypdf (blocking: CPU-bound)."""
    import pypdf  # lazily, like trafilatura

    try:
        reader = pypdf.PdfReader(io.BytesIO(body), strict=False)
        # An empty user password is common (print/copy restrictions only) and reads fine.
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValidationError("the PDF is encrypted with a password; decrypt it first", param="body")
        n_pages = len(reader.pages)
        if n_pages > MAX_PDF_PAGES:
            raise ValidationError(f"the PDF has too many pages ({n_pages}; at most {MAX_PDF_PAGES})", param="body")
        texts: list[str] = []
        total = 0
        for page in reader.pages:
            page_text = page.extract_text() or ""
            total += len(page_text)
            if total > MAX_TEXT_CHARS:
                raise _too_long(total)
            texts.append(page_text)
        meta = reader.metadata
        title = str(meta.title or "") if meta is not None else ""
    except ValidationError:
        raise
    except Exception as err:  # pypdf raises assorted types (PdfReadError, ValueError, KeyError, ...) on broken files
        raise ValidationError(f"the PDF could not be read: {type(err).__name__}: {str(err)[:200]}", param="body") from None
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise ValidationError(
            f"the PDF has no text layer ({n_pages} page(s) of images only, e.g. a scan); text recognition (OCR) is not supported",
            param="body",
        )
    return title, text


# ------------------------------------------------------------------------------ entry point


def extract(body: bytes, content_type: str, *, url: str = "", charset: str | None = None) -> Extracted:
    """Turn a document's bytes into its title and main text (blocking: run in a thread).

    content_type may carry parameters ("text/html; charset=latin-1"); `charset` wins over
    them. Raises ValidationError naming the problem for an unsupported type, undecodable
    bytes, an encrypted or image-only PDF, text over the size cap, or no text at all.
    """
    kind, declared = media_type(content_type)
    charset = charset or declared
    if kind not in SUPPORTED_TYPES:
        raise ValidationError(
            f"unsupported document type {kind or '(none)'!r}; supported: " + ", ".join(sorted(SUPPORTED_TYPES)), param="content_type"
        )
    if not body.strip():
        raise ValidationError("the document is empty", param="body")
    if kind in HTML_TYPES:
        title, raw = _extract_html(body, charset, url)
    elif kind in PDF_TYPES:
        title, raw = _extract_pdf(body)
    else:
        raw = decode_text(body, charset)
        if "\x00" in raw:
            raise ValidationError("the document looks binary (it contains NUL bytes), not text", param="body")
        heading = _MD_HEADING_RE.search(raw) if kind in MARKDOWN_TYPES else None
        title = heading.group(1) if heading else ""
    if len(raw) > 2 * MAX_TEXT_CHARS:  # hopeless even after whitespace is tidied: spare the work
        raise _too_long(len(raw))
    text = normalise_text(raw)
    if len(text) > MAX_TEXT_CHARS:
        raise _too_long(len(text))
    if not text:
        raise ValidationError("the document has no text to store", param="body")
    return Extracted(title=_short_title(normalise_text(title)), text=text, content_type=kind)
