"""Iris extraction (pure): HTML main text, plain text and Markdown charsets, PDF text layers, chunks, fingerprints."""

from __future__ import annotations

import io
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongarsd.cognition.iris import extract as extract_mod
from mongarsd.cognition.iris.extract import CHUNK_CHARS, MIN_CHUNK_CHARS, chunk_text, extract, fingerprint, media_type
from mongarsd.errors import ValidationError

ARTICLE = (
    "Lisbon is home to a large population of street cats that live in the old quarters of Alfama and Mouraria. "
    "Residents feed them every day and many neighbourhoods build small wooden shelters for the winter."
)
ARTICLE_2 = (
    "The municipal sterilisation programme started in 2009 and has since treated more than twelve thousand cats, "
    "according to the annual report the city council publishes every spring."
)

BOILERPLATE_PAGE = f"""<!doctype html>
<html><head><title>Cats of Lisbon - Example News</title>
<script>window.tracker = "SCRIPTMARKER";</script><style>.x {{ color: red }}</style></head>
<body>
<nav><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/contact">Contact</a> | <a href="/login">Login</a></nav>
<div class="cookie-banner">We use cookies to improve your experience. COOKIEMARKER Accept all cookies.</div>
<article>
<h1>The cats of Lisbon</h1>
<p>{ARTICLE}</p>
<p>{ARTICLE_2}</p>
<p>Visitors often photograph the cats sleeping on warm tiles near the cathedral in the afternoon sun.</p>
</article>
<aside><h3>Related</h3><ul><li><a href="/a">Ten best beaches</a></li><li><a href="/b">Tram 28 guide</a></li></ul></aside>
<footer>Copyright 2024 Example Corp. FOOTERMARKER All rights reserved. Privacy policy. Terms of use.</footer>
</body></html>""".encode()


# ------------------------------------------------------------------------------ tiny PDFs


def make_pdf(pages: list[str], *, title: str | None = None) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page, xref offsets computed."""
    objects: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info_ref = ""
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode("latin-1"))
        info_ref = f" /Info {len(objects)} 0 R"
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{n} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info_ref} >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def encrypted(pdf: bytes, user_password: str) -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def blank_pdf() -> bytes:
    import pypdf

    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=612, height=792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# ------------------------------------------------------------------------------ HTML


def test_html_main_text_without_boilerplate() -> None:
    doc = extract(BOILERPLATE_PAGE, "text/html; charset=utf-8", url="http://127.0.0.1/cats")
    assert doc.content_type == "text/html"
    assert "Alfama and Mouraria" in doc.text and "twelve thousand cats" in doc.text
    for marker in ("SCRIPTMARKER", "COOKIEMARKER", "FOOTERMARKER", "Tram 28 guide", "color: red"):
        assert marker not in doc.text, marker
    assert "cats of lisbon" in doc.title.lower()


def test_html_too_small_for_trafilatura_falls_back_to_visible_text() -> None:
    page = b"<html><head><title>Hours</title><script>var hidden = 'SCRIPTMARKER';</script></head><body><p>Open 9-17</p></body></html>"
    doc = extract(page, "text/html")
    assert doc.text == "Open 9-17"
    assert doc.title == "Hours"


def test_html_charset_from_meta_and_from_header() -> None:
    page = '<html><head><meta charset="iso-8859-1"><title>Café</title></head><body><p>Crème brûlée à Paris.</p></body></html>'
    body = page.encode("latin-1")
    assert "Crème brûlée à Paris." in extract(body, "text/html").text
    assert "Crème brûlée à Paris." in extract(body, "text/html", charset="latin-1").text
    with pytest.raises(ValidationError, match="not readable text"):
        extract(body.replace(b"iso-8859-1", b"utf-8"), "text/html")


# ------------------------------------------------------------------------------ text and Markdown


def test_markdown_title_from_first_heading() -> None:
    md = "Some intro line.\n\n# Growing tomatoes\n\nWater them   every\tmorning.\n\n\n\n## Soil\n\nRich soil helps.\n"
    doc = extract(md.encode(), "text/markdown")
    assert doc.title == "Growing tomatoes"
    assert doc.content_type == "text/markdown"
    assert "Water them every morning." in doc.text
    assert "\n\n\n" not in doc.text  # blank lines collapsed to one


@pytest.mark.parametrize(
    ("body", "content_type", "charset"),
    [
        ("Ça coûte 5 €.".encode(), "text/plain", None),
        (b"\xef\xbb\xbf" + "Ça coûte 5 €.".encode(), "text/plain", None),
        ("Ça coûte 5 €.".encode("utf-16"), "text/plain", None),
        ("Ça coûte 5 €.".encode("cp1252"), "text/plain; charset=windows-1252", None),
        ("Ça coûte 5 €.".encode("cp1252"), "text/plain", "cp1252"),
    ],
)
def test_plain_text_charsets(body: bytes, content_type: str, charset: str | None) -> None:
    doc = extract(body, content_type, charset=charset)
    assert doc.text == "Ça coûte 5 €."
    assert doc.title == ""


def test_undecodable_text_names_the_charsets_tried() -> None:
    with pytest.raises(ValidationError) as err:
        extract("Ça coûte".encode("latin-1"), "text/plain")
    assert "utf-8" in str(err.value) and "charset" in str(err.value)
    with pytest.raises(ValidationError) as err2:
        extract("Ça coûte".encode("latin-1"), "text/plain", charset="no-such-charset")
    assert "no-such-charset (an unknown charset)" in str(err2.value)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"GIF89a....", "image/gif", "unsupported document type 'image/gif'"),
        (b"", "text/plain", "empty"),
        (b"  \n\t ", "text/plain", "empty"),
        (b"abc\x00\x01def", "text/plain", "binary"),
        (b"\x01\x02\x03", "text/plain", "no text"),
        (b"<html><body><script>only()</script></body></html>", "text/html", "no text"),
    ],
)
def test_refusals_name_the_problem(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        extract(body, content_type)


def test_text_over_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_mod, "MAX_TEXT_CHARS", 1000)
    assert len(extract(b"word " * 150, "text/plain").text) < 1000
    with pytest.raises(ValidationError, match="too long"):
        extract(b"word " * 300, "text/plain")


def test_media_type_parsing() -> None:
    assert media_type('Text/HTML; Charset="ISO-8859-1"') == ("text/html", "ISO-8859-1")
    assert media_type("application/pdf") == ("application/pdf", None)


# ------------------------------------------------------------------------------ PDF


def test_pdf_text_layer_and_title() -> None:
    pdf = make_pdf(["First page about volcanoes in Iceland.", "Second page about geysers."], title="Iceland notes")
    doc = extract(pdf, "application/pdf")
    assert doc.content_type == "application/pdf"
    assert "volcanoes in Iceland" in doc.text and "geysers" in doc.text
    assert doc.text.index("volcanoes") < doc.text.index("geysers")
    assert doc.title == "Iceland notes"


def test_pdf_with_empty_user_password_reads() -> None:
    doc = extract(encrypted(make_pdf(["Readable despite restrictions."]), ""), "application/pdf")
    assert "Readable despite restrictions." in doc.text


def test_pdf_encrypted_with_password_is_refused() -> None:
    with pytest.raises(ValidationError, match="encrypted"):
        extract(encrypted(make_pdf(["Secret plans."]), "hunter2"), "application/pdf")


def test_pdf_without_text_layer_is_refused() -> None:
    with pytest.raises(ValidationError, match="no text layer"):
        extract(blank_pdf(), "application/pdf")


@pytest.mark.parametrize("body", [b"%PDF-1.4\nthis is not a pdf at all", b"not even a header", make_pdf(["x"])[:60]])
def test_broken_pdf_is_a_validation_error(body: bytes) -> None:
    with pytest.raises(ValidationError, match="PDF"):
        extract(body, "application/pdf")


def test_importing_iris_loads_no_extraction_library() -> None:
    code = (
        "import sys, mongarsd.cognition.iris.extract, mongarsd.cognition.iris.ingest, mongarsd.api.ingest, mongarsd.cognition.iris.cli;"
        "heavy = sorted(m for m in ('trafilatura', 'pypdf', 'lxml') if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ chunks


def test_chunks_pack_whole_paragraphs() -> None:
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(10)]  # about 165 characters each
    chunks = chunk_text("\n\n".join(paras), max_chars=400)
    assert all(len(c) <= 400 for c in chunks)
    assert all(c.startswith("Paragraph") for c in chunks)  # a chunk never starts mid-paragraph here
    assert chunks[0] == paras[0].strip() + "\n\n" + paras[1].strip()
    assert len(chunks) == 5


def test_long_paragraph_splits_at_sentences_then_words() -> None:
    sentences = [f"Sentence number {i} talks about the weather in a long way." for i in range(30)]
    chunks = chunk_text(" ".join(sentences), max_chars=200)
    assert all(len(c) <= 200 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # cut at sentence ends
    no_stops = "alpha " * 200
    word_chunks = chunk_text(no_stops, max_chars=100)
    assert all(len(c) <= 100 and not c.startswith(" ") for c in word_chunks)
    assert " ".join(word_chunks).split() == no_stops.split()
    giant = "x" * 250
    assert chunk_text(giant, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_chunk_limits() -> None:
    with pytest.raises(ValidationError, match="more than 3 chunks"):
        chunk_text("\n\n".join("p" * 90 for _ in range(10)), max_chars=100, max_chunks=3)
    assert len(chunk_text("\n\n".join("p" * 90 for _ in range(3)), max_chars=100, max_chunks=3)) == 3
    with pytest.raises(ValidationError, match="at least"):
        chunk_text("text", max_chars=MIN_CHUNK_CHARS - 1)
    with pytest.raises(ValidationError, match="no text"):
        chunk_text(" \n\n \n")
    assert CHUNK_CHARS <= 1000


@given(st.text(alphabet=st.sampled_from("ab .\n\té!"), max_size=3000), st.integers(min_value=MIN_CHUNK_CHARS, max_value=400))
def test_chunks_are_bounded_and_keep_every_word(text: str, max_chars: int) -> None:
    if not text.split():
        with pytest.raises(ValidationError):
            chunk_text(text, max_chars=max_chars)
        return
    chunks = chunk_text(text, max_chars=max_chars, max_chunks=10_000)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_normalises_whitespace_and_unicode() -> None:
    a = fingerprint("Hello   world.\n\nSecond\tparagraph. Café")
    assert a == fingerprint("  Hello world.\nSecond paragraph.\r\nCafé  ")
    assert a == fingerprint(unicodedata.normalize("NFD", "Hello world. Second paragraph. Café"))
    assert a != fingerprint("Hello world. Second paragraph. Cafe")
    assert len(a) == 64 and int(a, 16) >= 0
