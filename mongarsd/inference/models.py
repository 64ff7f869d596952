"""Model registry: the GGUF files in the models folder, validated and named."""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from mongarsd.errors import ModelError, UnknownModelError
from mongarsd.inference.gguf import GGUFInfo, read_gguf

log = structlog.get_logger("mongarsd.inference.models")

MODEL_SUFFIX = ".gguf"
HASH_CHUNK_BYTES = 1 << 20
MAX_MODEL_ID_CHARS = 128

_SLUG_RE = re.compile(r"[^a-z0-9.]+")
_QUANT_TAIL_RE = re.compile(r"[-_.](?:f32|f16|bf16|q\d(?:_[a-z0-9]+)*|iq\d(?:_[a-z0-9]+)*|tq\d_\d|mxfp4(?:_moe)?)$")


def slugify(text: str) -> str:
    """Lowercase `text` and join its alphanumeric runs with '-'."""
    return _SLUG_RE.sub("-", text.lower()).strip("-.")


def model_id_for(file_stem: str, quantization: str | None) -> str:
    """Return the registry id for a file: `<stem without quant suffix>:<quant>` lowercased.

    `SmolLM2-135M-Instruct-Q4_1` with quantization Q4_1 -> `smollm2-135m-instruct:q4_1`.
    The file name is used rather than general.name because converters often write
    training-run names there (SmolLM2's says "Smollm2 135M 8k Lc100K Mix1 Ep2").
    """
    stem = file_stem.lower()
    quant = (quantization or "").lower()
    if quant and stem.endswith(quant) and len(stem) > len(quant) + 1:
        if stem[-len(quant) - 1] in "-_.":
            stem = stem[: -len(quant) - 1]
    else:
        stem = _QUANT_TAIL_RE.sub("", stem)
    base = slugify(stem) or "model"
    tag = slugify(quant).replace("-", "_") or "latest"
    return (base + ":" + tag)[:MAX_MODEL_ID_CHARS]


@dataclass(slots=True)
class ModelEntry:
    """One usable model file and what its header says."""

    id: str
    path: Path
    size: int
    modified_at: datetime
    architecture: str | None
    name: str | None
    parameters: int | None
    size_label: str | None
    quantization: str | None
    context_length: int | None
    chat_template: str | None
    _sha256: str | None = field(default=None, repr=False)
    _hash_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sha256(self) -> str:
        """Return the file's SHA-256, computed on first use (blocking: reads the file)."""
        with self._hash_lock:
            if self._sha256 is None:
                digest = hashlib.sha256()
                with self.path.open("rb") as stream:
                    while chunk := stream.read(HASH_CHUNK_BYTES):
                        digest.update(chunk)
                self._sha256 = digest.hexdigest()
            return self._sha256

    @property
    def sha256_known(self) -> bool:
        return self._sha256 is not None


@dataclass(frozen=True, slots=True)
class ModelFileError:
    """A file in the models folder that could not be used, and why."""

    path: Path
    error: str


def entry_from_file(path: Path, info: GGUFInfo | None = None) -> ModelEntry:
    """Build a registry entry for `path` (blocking: reads the header)."""
    if info is None:
        info = read_gguf(path)
    stat = path.stat()
    return ModelEntry(
        id=model_id_for(path.stem, info.quantization),
        path=path,
        size=stat.st_size,
        modified_at=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        architecture=info.architecture,
        name=info.name,
        parameters=info.parameter_count,
        size_label=info.size_label,
        quantization=info.quantization,
        context_length=info.context_length,
        chat_template=info.chat_template,
    )


class ModelRegistry:
    """The *.gguf files of one folder; blocking methods do file I/O (run them in a thread)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._entries: dict[str, ModelEntry] = {}
        self._errors: list[ModelFileError] = []
        self._lock = threading.RLock()
        self._scanned = False

    def scan(self) -> None:
        """Re-read every *.gguf header in the folder (blocking); bad files become errors."""
        entries: dict[str, ModelEntry] = {}
        errors: list[ModelFileError] = []
        try:
            paths = sorted(p for p in self.models_dir.iterdir() if p.suffix == MODEL_SUFFIX)
        except FileNotFoundError:
            paths = []
        except OSError as err:
            raise ModelError("cannot list models folder " + str(self.models_dir) + ": " + str(err)) from err
        for path in paths:
            try:
                if not path.is_file():
                    continue
                entry = entry_from_file(path)
            except (ModelError, OSError) as err:
                # a bad file must never take the registry down: list it as an error
                errors.append(ModelFileError(path, str(err)))
                log.warning("model_file_invalid", path=str(path), error=str(err))
                continue
            if entry.id in entries:
                errors.append(ModelFileError(path, "duplicate model id " + entry.id + " (also " + str(entries[entry.id].path.name) + ")"))
                continue
            entries[entry.id] = entry
        with self._lock:
            old = self._entries
            for model_id, entry in entries.items():
                prev = old.get(model_id)
                if prev is not None and prev.path == entry.path and prev.size == entry.size and prev.modified_at == entry.modified_at:
                    entries[model_id] = prev  # keep a computed sha256
            self._entries = entries
            self._errors = errors
            self._scanned = True

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self.scan()

    def list(self) -> list[ModelEntry]:
        """Return the usable models sorted by id (scans on first use)."""
        with self._lock:
            self._ensure_scanned()
            return sorted(self._entries.values(), key=lambda e: e.id)

    def errors(self) -> builtins.list[ModelFileError]:
        """Return the files that could not be used at the last scan."""
        with self._lock:
            self._ensure_scanned()
            return list(self._errors)

    def get(self, model_id: str) -> ModelEntry:
        """Return the entry for `model_id`; unknown ids raise ModelError naming the known ones."""
        with self._lock:
            self._ensure_scanned()
            entry = self._entries.get(model_id.strip().lower())
            if entry is None and ":" not in model_id:
                matches = [e for e in self._entries.values() if e.id.split(":")[0] == model_id]
                if len(matches) == 1:
                    entry = matches[0]
            if entry is None:
                known = ", ".join(sorted(self._entries)) or "none"
                raise UnknownModelError("unknown model " + repr(model_id) + "; available: " + known)
            return entry

    def add(self, src_path: Path, *, file_name: str | None = None) -> ModelEntry:
        """Validate `src_path` and copy it into the folder (blocking); return its entry."""
        info = read_gguf(src_path)
        name = file_name or src_path.name
        if not name.endswith(MODEL_SUFFIX) or "/" in name or name.startswith("."):
            raise ModelError("model file name must be a plain *.gguf name, got " + repr(name))
        dest = self.models_dir / name
        model_id = model_id_for(dest.stem, info.quantization)
        with self._lock:
            self._ensure_scanned()
            if model_id in self._entries or dest.exists():
                raise ModelError("model " + model_id + " already exists (" + name + ")")
            self.models_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name("." + name + ".part")
            try:
                shutil.copyfile(src_path, tmp)
                # validate the copy too: the source may have changed while we copied
                read_gguf(tmp)
                os.replace(tmp, dest)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise ModelError("cannot copy model " + str(src_path) + ": " + str(err)) from err
            except ModelError:
                tmp.unlink(missing_ok=True)
                raise
            entry = entry_from_file(dest, info)
            self._entries[entry.id] = entry
            log.info("model_added", model=entry.id, path=str(dest), size=entry.size)
            return entry

    def remove(self, model_id: str) -> None:
        """Delete the model's file (blocking); unknown ids raise ModelError."""
        with self._lock:
            entry = self.get(model_id)
            try:
                entry.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise ModelError("cannot remove model " + entry.id + ": " + str(err)) from err
            self._entries.pop(entry.id, None)
            log.info("model_removed", model=entry.id, path=str(entry.path))
