"""Small real documents built in memory for the file and ingestion tests (fpdf2, python-docx, python-pptx, ...)."""

import io
import json
import os

HR_POLICY = (
    "Northwind Traders Employee Handbook: Human Resources Policy",
    "Working hours. The standard working week is 38 hours, Monday to Friday, with flexible start times "
    "between 7:30 and 10:00.",
    "Vacation. Every full-time employee gets 27 paid vacation days per calendar year. Part-time employees "
    "receive vacation days in proportion to their contracted hours. Up to 5 unused vacation days may be "
    "carried over to the next year.",
    "Sick leave. Employees must report sickness to their manager before 9:00 on the first day of absence. "
    "A doctor's note is required from the fourth day.",
    "Parental leave. Parents are entitled to 16 weeks of paid parental leave after the birth or adoption "
    "of a child.",
)
"""Paragraphs of the HR policy; the answer to 'how many vacation days' is 27."""

PARTS_CATALOGUE = {
    "pumps-a.txt": "The XJ-4470 circulation pump moves up to 40 litres per minute and carries a two-year warranty.",
    "pumps-b.txt": "Model XJ-4417 is our quietest pump: 28 decibels at full speed, with a five-year warranty on the "
                   "motor.",
    "returns.txt": "Pumps returned within 30 days are refunded in full; a pump with a damaged seal is replaced free of "
                   "charge.",
    "valves.txt": "Replacement part XJ-4471 is the brass check valve fitted to every boiler we sold before 2019.",
    "install.txt": "Install the pump upright, bleed the air from the pipes, then run it for ten minutes before the "
                   "first use.",
    "noise.txt": "A pump that rattles usually has air in it: bleed the system and check that the mounting bolts are "
                 "tight.",
}
"""One small file per part: the only chunk naming XJ-4471 (valves.txt) is, by meaning, further from "which pump is
XJ-4471" than two chunks about pumps with look-alike codes (the local embedding model reads `XJ-4471` as
`xj - 44 ##71`): search by meaning alone ranks it third, hybrid search first."""


def pdf(paragraphs: tuple[str, ...] | list[str] = HR_POLICY) -> bytes:
    """A text PDF (one paragraph per block) made with fpdf2."""
    from fpdf import FPDF

    doc = FPDF()
    doc.set_title(paragraphs[0])
    doc.add_page()
    doc.set_font("Helvetica", "B", 14)
    doc.multi_cell(0, 8, paragraphs[0])
    doc.ln(4)
    doc.set_font("Helvetica", size=11)
    for paragraph in paragraphs[1:]:
        doc.multi_cell(0, 6, paragraph)
        doc.ln(3)
    return bytes(doc.output())


def encrypted_pdf(password: str = "s3cret") -> bytes:
    """A PDF that needs a password to open (pikepdf, AES-256)."""
    import pikepdf

    with pikepdf.open(io.BytesIO(pdf())) as source:
        out = io.BytesIO()
        source.save(out, encryption=pikepdf.Encryption(user=password, owner=password + "-owner"))
    return out.getvalue()


def corrupt_pdf() -> bytes:
    """A PDF header followed by garbage (truncated, no xref, no trailer)."""
    return b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nstream\n" + bytes(range(256)) * 4


def docx(title: str, paragraphs: list[str]) -> bytes:
    """A Word document with a heading and paragraphs (python-docx)."""
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading(title, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def pptx(title: str, body: str) -> bytes:
    """A one-slide PowerPoint deck (python-pptx)."""
    import pptx as python_pptx

    deck = python_pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = title
    slide.placeholders[1].text = body
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def html(title: str, body: str) -> bytes:
    """A small HTML page."""
    return (f"<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1>"
            f"<p>{body}</p></body></html>").encode()


def markdown(title: str, body: str) -> bytes:
    """A Markdown document with a heading, a paragraph and a list."""
    return f"# {title}\n\n{body}\n\n- first point\n- second point\n".encode()


def text(body: str) -> bytes:
    """Plain UTF-8 text in two paragraphs."""
    return f"{body}\n\nThis second paragraph is filler text.\n".encode()


def csv(rows: list[tuple[str, ...]]) -> bytes:
    """A CSV table."""
    return "\n".join(",".join(r) for r in rows).encode() + b"\n"


def json_doc(data: object) -> bytes:
    """A JSON document."""
    return json.dumps(data).encode()


def binary(size: int = 4096) -> bytes:
    """Random bytes (no known format)."""
    return os.urandom(size)


def long_text(paragraphs: int = 40) -> bytes:
    """Several thousand tokens of distinct numbered sentences (forces many chunks)."""
    lines = [f"Paragraph {i}: the warehouse in sector {i} stores {i * 7} crates of item code X{i:04d}, "
             f"checked every {i % 9 + 1} days by team {chr(65 + i % 26)}." for i in range(paragraphs)]
    return "\n\n".join(lines).encode()
