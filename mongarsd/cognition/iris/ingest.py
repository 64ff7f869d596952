"""Iris ingestion: local files and folders, fetched pages and given text become document memories.

A document is extracted to text, fingerprinted, chunked and handed to the Hippocampus,
which embeds the chunks in batches and stores them in one write transaction. The same text
ingested twice by one owner is stored once (dedupe by fingerprint); the same source with new
text replaces the old document. Documents an admin shares belong to SHARED_OWNER, whose
document memories every user's recall reads.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from mongarsd.cognition.iris.extract import Extracted, chunk_text, extract, fingerprint
from mongarsd.errors import MongarsError, UnavailableError, ValidationError
from mongarsd.memory.hippocampus import SHARED_OWNER, Document, Hippocampus

if TYPE_CHECKING:
    from mongarsd.cognition.iris.fetch import Fetcher

log = structlog.get_logger("mongarsd.cognition.iris.ingest")

__all__ = ["SHARED_OWNER", "SUFFIX_TYPES", "IngestResult", "Ingestor", "scan_folder"]

SUFFIX_TYPES: Final = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".xhtml": "application/xhtml+xml",
    ".pdf": "application/pdf",
}
MAX_FILE_BYTES: Final = 32 << 20  # one file read from disk
MAX_FOLDER_FILES: Final = 2000  # documents one folder ingest reads (the rest are reported, not read)
MAX_FOLDER_DEPTH: Final = 16
MAX_SOURCE_CHARS: Final = 2048
MAX_CONCURRENT_INGESTS: Final = 2  # extractions at once: each holds a core and the document's text
SCAN_ERROR_BACKOFF_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class IngestResult:
    document_id: int  # 0 when the document could not be ingested (then `error` says why)
    source: str
    title: str
    chunks: int
    bytes: int
    duplicate: bool
    error: str | None = None  # a file of a folder that could not be ingested: the reason, the folder goes on

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        if out["error"] is None:
            del out["error"]
        return out


def _result(doc: Document, duplicate: bool) -> IngestResult:
    return IngestResult(doc.id, doc.source, doc.title, doc.chunks, doc.bytes, duplicate)


def _failed(source: str, error: str, size: int = 0) -> IngestResult:
    return IngestResult(0, source, "", 0, size, False, error)


# ------------------------------------------------------------------------------ blocking helpers


def scan_folder(
    root: Path, *, max_files: int = MAX_FOLDER_FILES, max_depth: int = MAX_FOLDER_DEPTH
) -> tuple[list[Path], list[IngestResult]]:
    """List the documents under root, sorted (blocking: run in a thread).

    Symbolic links are never followed, hidden entries (a leading dot) are skipped, and
    depth and count are bounded. Returns (document files, reports of what was left out:
    unsupported types, links, special files, unreadable folders, the count cap).
    """
    files: list[Path] = []
    skipped: list[IngestResult] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            skipped.append(_failed(str(folder), f"cannot read folder: {err.strerror or err}"))
            continue
        subfolders: list[Path] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                skipped.append(_failed(str(path), "symbolic link not followed"))
            elif entry.is_dir(follow_symlinks=False):
                if depth + 1 > max_depth:
                    skipped.append(_failed(str(path), f"folder deeper than {max_depth} levels not read"))
                else:
                    subfolders.append(path)
            elif not entry.is_file(follow_symlinks=False):
                skipped.append(_failed(str(path), "not a regular file"))
            elif path.suffix.lower() not in SUFFIX_TYPES:
                skipped.append(_failed(str(path), f"unsupported file type {path.suffix or '(no suffix)'!r}; supported: {_suffixes()}"))
            elif len(files) >= max_files:
                skipped.append(_failed(str(root), f"more than {max_files} documents in this folder; the rest were not read"))
                return files, skipped
            else:
                files.append(path)
        stack.extend((sub, depth + 1) for sub in reversed(subfolders))  # depth first, in name order
    return files, skipped


def _suffixes() -> str:
    return " ".join(sorted(SUFFIX_TYPES))


def read_document_file(path: Path, *, follow_symlinks: bool = True) -> tuple[bytes, os.stat_result]:
    """Read a regular file of at most MAX_FILE_BYTES (blocking: run in a thread).

    Opened non-blocking (a FIFO never hangs us) and, inside folders, without following a
    final symlink (a file swapped for a link between the scan and the read is refused).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValidationError(f"{path} is a symbolic link; links inside folders are not followed", param="path") from None
        raise ValidationError(f"cannot open {path}: {err.strerror or err}", param="path") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"{path} is not a regular file", param="path")
        if st.st_size > MAX_FILE_BYTES:
            raise ValidationError(f"{path} is too large ({st.st_size} bytes; at most {MAX_FILE_BYTES})", param="path")
        try:
            body = fh.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise ValidationError(f"cannot read {path}: {err.strerror or err}", param="path") from None
    if len(body) > MAX_FILE_BYTES:
        raise ValidationError(f"{path} is too large (more than {MAX_FILE_BYTES} bytes)", param="path")
    return body, st


def prepare_document(body: bytes, content_type: str, *, url: str = "", charset: str | None = None) -> tuple[Extracted, list[str], str]:
    """Extract, chunk and fingerprint a document (blocking: run in a thread)."""
    extracted = extract(body, content_type, url=url, charset=charset)
    return extracted, chunk_text(extracted.text), fingerprint(extracted.text)


def _stat_or_none(path: Path) -> os.stat_result | None:
    """lstat a path; None when it is gone (blocking: run in a thread)."""
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _gone(path: Path) -> bool:
    """Tell whether a path surely no longer exists; unreadable is not gone (blocking: run in a thread)."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def locate(path: Path) -> tuple[Path, os.stat_result | None]:
    """Make a path absolute, following it if it is itself a link; with its stat, None if missing (blocking: run in a thread)."""
    root = Path(os.path.abspath(path.expanduser()))
    st = _stat_or_none(root)
    if st is not None and stat.S_ISLNK(st.st_mode):
        # A link named on purpose (argument or config) is followed; links inside folders are not.
        root = root.resolve()
        st = _stat_or_none(root)
    return root, st


def _fallback_title(source: str) -> str:
    """A title from the source when the document has none: a file's name, a URL's last path segment or host (pure)."""
    if "://" in source:
        parts = urllib.parse.urlsplit(source)
        name = urllib.parse.unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
        return name or parts.hostname or source
    return Path(source).name or source


def _check_owner_source(owner: str, source: str) -> None:
    if not owner:
        raise ValidationError("a document needs an owner", param="owner")
    if not source.strip():
        raise ValidationError("a document needs a source (a path, a URL or a name)", param="source")
    if len(source) > MAX_SOURCE_CHARS:
        raise ValidationError(f"the source is too long ({len(source)} characters; at most {MAX_SOURCE_CHARS})", param="source")


# ------------------------------------------------------------------------------ service


class Ingestor:
    """Documents into memory: files, folders, fetched URLs and given text, per owner."""

    name = "iris-ingestor"
    start_timeout_s = 1.0
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        hippocampus: Hippocampus,
        fetcher: Fetcher | None,
        folders: Sequence[Path] = (),
        scan_interval_s: float = 3600.0,
    ) -> None:
        self._hippo = hippocampus
        self._fetcher = fetcher
        self.folders = tuple(folders)
        self.scan_interval_s = scan_interval_s
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_INGESTS)
        self.ingested_total = 0
        self.duplicates_total = 0
        self.failures_total = 0
        self.scans_total = 0
        self.last_scan_at = 0.0

    async def async_start(self) -> None:
        return None  # nothing to open: the scan loop is supervised by the daemon

    async def async_stop(self) -> None:
        return None

    # ---------------------------------------------------------------- one document

    async def async_ingest_bytes(
        self,
        body: bytes,
        content_type: str,
        *,
        source: str,
        owner: str,
        title: str = "",
        charset: str | None = None,
        fetched_at: float | None = None,
    ) -> IngestResult:
        """Extract, chunk and store one document for `owner`; ValidationError says why one cannot be."""
        try:
            _check_owner_source(owner, source)
            async with self._slots:
                url = source if "://" in source else ""
                extracted, chunks, fp = await asyncio.to_thread(prepare_document, body, content_type, url=url, charset=charset)
            stored = await self._hippo.async_store_document(
                owner,
                chunks,
                source=source,
                title=" ".join(title.split())[:300] or extracted.title or _fallback_title(source),
                fingerprint=fp,
                content_type=extracted.content_type,
                size=len(body),
                fetched_at=fetched_at,
            )
        except MongarsError:
            self.failures_total += 1
            raise
        if stored.duplicate:
            self.duplicates_total += 1
        else:
            self.ingested_total += 1
        return _result(stored.document, stored.duplicate)

    async def async_ingest_url(self, url: str, *, owner: str) -> IngestResult:
        """Fetch a page through the polite fetcher and ingest it; ValidationError naming the problem otherwise.

        A refused or failed fetch raises the fetcher's FetchError, a ValidationError whose
        status says why (403 not allowed or robots.txt, 413 too large, 502/504 the site failed).
        """
        if self._fetcher is None:
            raise UnavailableError("fetching URLs is not enabled on this daemon ([iris] enabled = false)")
        _check_owner_source(owner, url)
        try:
            page = await self._fetcher.async_fetch(url)
        except MongarsError:
            self.failures_total += 1
            raise
        return await self.async_ingest_bytes(
            page.body, page.content_type, source=page.final_url or url, owner=owner, charset=page.charset, fetched_at=page.fetched_at
        )

    async def async_ingest_path(self, path: Path, *, owner: str) -> list[IngestResult]:
        """Ingest a file, or every document file under a folder (bad files reported in the results, not fatal)."""
        root, st = await asyncio.to_thread(locate, path)
        if st is None:
            raise ValidationError(f"{root} does not exist", param="path")
        if stat.S_ISDIR(st.st_mode):
            return await self._async_ingest_folder(root, owner=owner)
        if root.suffix.lower() not in SUFFIX_TYPES:
            raise ValidationError(
                f"unsupported file type {root.suffix or '(no suffix)'!r} for {root}; supported: {_suffixes()}", param="path"
            )
        return [await self._async_ingest_file(root, owner=owner, follow_symlinks=True)]

    async def _async_ingest_file(self, path: Path, *, owner: str, follow_symlinks: bool) -> IngestResult:
        source = str(path)
        st = await asyncio.to_thread(_stat_or_none, path)
        known = await self._hippo.async_find_document(owner, source=source)
        if known is not None and st is not None and known.bytes == st.st_size and st.st_mtime <= known.fetched_at:
            # Unchanged since it was read (same size, not modified after): skip the extraction.
            return _result(known, True)
        started = time.time()  # a change while we read leaves mtime after this, so the next scan reads it again
        body, _ = await asyncio.to_thread(read_document_file, path, follow_symlinks=follow_symlinks)
        return await self.async_ingest_bytes(body, SUFFIX_TYPES[path.suffix.lower()], source=source, owner=owner, fetched_at=started)

    async def _async_ingest_folder(self, root: Path, *, owner: str) -> list[IngestResult]:
        files, results = await asyncio.to_thread(scan_folder, root)
        for path in files:
            try:
                results.append(await self._async_ingest_file(path, owner=owner, follow_symlinks=False))
            except ValidationError as err:
                results.append(_failed(str(path), str(err)))
        failed = sum(1 for r in results if r.error)
        log.info("folder_ingested", folder=str(root), owner=owner, files=len(files), failed=failed)
        return results

    # ---------------------------------------------------------------- listing, deleting

    async def async_list(self, owner: str) -> list[dict[str, Any]]:
        """The owner's documents, newest first."""
        return [d.public() for d in await self._hippo.async_list_documents(owner)]

    async def async_delete(self, owner: str, document_id: int) -> None:
        """Delete one of the owner's documents and its memories; NotFoundError if it is not theirs."""
        await self._hippo.async_delete_document(owner, document_id)

    # ---------------------------------------------------------------- configured folders

    async def async_scan_once(self) -> list[IngestResult]:
        """Ingest every configured folder as shared documents, and forget shared files deleted from them."""
        results: list[IngestResult] = []
        for folder in self.folders:
            root, st = await asyncio.to_thread(locate, folder)
            if st is None or not stat.S_ISDIR(st.st_mode):
                # An unmounted or mistyped folder: say so, and never forget its documents for it.
                log.warning("iris_folder_missing", folder=str(root))
                results.append(_failed(str(root), "folder does not exist"))
                continue
            found = await self.async_ingest_path(root, owner=SHARED_OWNER)
            results.extend(found)
            if not any(r.source == str(root) and r.error for r in found):  # a complete scan: what is missing is gone
                await self._async_forget_deleted(root)
        self.scans_total += 1
        self.last_scan_at = time.time()
        errors = [r for r in results if r.error]
        log.info(
            "iris_folders_scanned",
            folders=len(self.folders),
            documents=sum(1 for r in results if not r.error),
            new=sum(1 for r in results if not r.error and not r.duplicate),
            errors=len(errors),
        )
        for r in errors[:20]:
            log.warning("iris_file_not_ingested", source=r.source, error=r.error)
        return results

    async def _async_forget_deleted(self, root: Path) -> None:
        """Delete shared documents whose file under root is gone (a complete scan of root just ran)."""
        prefix = str(root) + os.sep
        for doc in await self._hippo.async_list_documents(SHARED_OWNER, limit=100_000):
            if not doc.source.startswith(prefix):
                continue
            if await asyncio.to_thread(_gone, Path(doc.source)):
                await self._hippo.async_delete_document(SHARED_OWNER, doc.id)
                log.info("iris_document_forgotten", source=doc.source, document_id=doc.id)

    async def async_scan_loop(self) -> None:
        """Ingest the configured folders now, then every scan_interval_s (run supervised)."""
        while True:
            try:
                await self.async_scan_once()
            except (MongarsError, OSError) as err:  # one failed pass (store busy, disk gone) must not end the loop
                log.error("iris_folder_scan_failed", error=str(err))
                self.failures_total += 1
                await asyncio.sleep(min(SCAN_ERROR_BACKOFF_S, self.scan_interval_s))
                continue
            await asyncio.sleep(self.scan_interval_s)

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        yield ("mongarsd_iris_documents_ingested_total", "counter", "Documents stored by Iris.", float(self.ingested_total), {})
        yield (
            "mongarsd_iris_documents_duplicate_total",
            "counter",
            "Ingests that found the same text stored.",
            float(self.duplicates_total),
            {},
        )
        yield ("mongarsd_iris_ingest_failures_total", "counter", "Ingests refused or failed.", float(self.failures_total), {})
        yield ("mongarsd_iris_folder_scans_total", "counter", "Passes over the configured folders.", float(self.scans_total), {})
