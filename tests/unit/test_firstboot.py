"""`mongarsd init`: identity and admin token file created once, 0600, secret never on stdout."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from mongarsd import cli, firstboot
from mongarsd.daemon import DB_FILE
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenInfo, TokenStore
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.mesh.service import IDENTITY_FILE, mesh_dir


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in [n for n in os.environ if n.startswith("MONGARSD_")]:
        monkeypatch.delenv(name)
    (tmp_path / "mongarsd.toml").write_text("")
    # cli.main points the process's logging at sys.stderr, here capsys's stream that closes with
    # the test: put back what later tests log through.
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path / "state"
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


def run_init(state: Path, *extra: str) -> int:
    return cli.main(["init", "--config", str(state.parent / "mongarsd.toml"), "--state-dir", str(state), *extra])


def with_tokens(state: Path, fn: Any) -> Any:
    """Run `fn(TokenStore)` against the state dir's database (blocking)."""

    async def main() -> Any:
        db = Database(path=state / DB_FILE)
        await db.async_start()
        try:
            return await fn(TokenStore(db=db))
        finally:
            await db.async_stop()

    return asyncio.run(main())


def verify(state: Path, secret: str) -> TokenInfo | None:
    info: TokenInfo | None = with_tokens(state, lambda s: s.async_verify(secret))
    return info


def live_admins(state: Path) -> list[TokenInfo]:
    infos: list[TokenInfo] = with_tokens(state, lambda s: s.async_list())
    return [i for i in infos if i.role == "admin" and i.revoked_at is None]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(state: Path) -> dict[str, tuple[bytes, int]]:
    files = [state / "admin.token", mesh_dir(state) / IDENTITY_FILE]
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_first_run_creates_identity_and_a_private_admin_token(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_umask = os.umask(0)  # a careless caller's umask must not widen the secret's mode
    try:
        assert run_init(state) == 0
    finally:
        os.umask(old_umask)
    out, err = capsys.readouterr()
    token_file = state / "admin.token"
    secret = token_file.read_text().strip()

    assert mode(token_file) == 0o600
    assert token_file.stat().st_uid == os.geteuid()
    assert mode(mesh_dir(state) / IDENTITY_FILE) == 0o600
    assert not [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
    assert len(out.splitlines()) == 1 and str(token_file) in out and "created admin token" in out
    assert secret not in out and secret not in err
    info = verify(state, secret)
    assert info is not None and info.role == "admin" and info.user == "admin"
    # The daemon loads the same identity file init created.
    assert NodeIdentity.load_or_create(mesh_dir(state) / IDENTITY_FILE).node_id in out


def test_second_run_changes_nothing(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_init(state) == 0
    before = snapshot(state)
    capsys.readouterr()

    assert run_init(state) == 0
    out, _ = capsys.readouterr()
    assert "nothing changed" in out and "exists" in out
    assert snapshot(state) == before
    assert len(live_admins(state)) == 1


def test_token_file_option(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "secrets" / "mongarsd-admin"
    elsewhere.parent.mkdir()
    assert run_init(state, "--token-file", str(elsewhere)) == 0
    out, _ = capsys.readouterr()
    assert str(elsewhere) in out and not (state / "admin.token").exists()
    assert mode(elsewhere) == 0o600
    assert verify(state, elsewhere.read_text().strip()) is not None


def test_an_existing_live_admin_token_is_left_alone(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state.mkdir()
    _, made = with_tokens(state, lambda s: s.async_create("root", "admin"))
    assert run_init(state) == 0
    out, _ = capsys.readouterr()
    assert made.id in out and "not creating another" in out
    assert not (state / "admin.token").exists()
    assert [i.id for i in live_admins(state)] == [made.id]


def test_a_stale_token_file_is_replaced_once_its_token_is_revoked(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_init(state) == 0
    token_file = state / "admin.token"
    old = token_file.read_text().strip()
    (first,) = live_admins(state)
    with_tokens(state, lambda s: s.async_revoke(first.id))

    assert run_init(state) == 0
    out, _ = capsys.readouterr()
    new = token_file.read_text().strip()
    assert new != old and "stale" in out and mode(token_file) == 0o600
    assert verify(state, old) is None and verify(state, new) is not None


def test_a_foreign_file_is_never_overwritten(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state.mkdir()
    token_file = state / "admin.token"
    token_file.write_text("my notes\n")
    assert run_init(state) == 1
    _, err = capsys.readouterr()
    assert "does not hold a mongarsd token" in err and "Traceback" not in err
    assert token_file.read_text() == "my notes\n"
    assert live_admins(state) == []


def test_unwritable_state_dir_is_a_clear_error(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A path below a regular file cannot be created, even by root (which ignores permissions).
    assert cli.main(["init", "--config", str(state.parent / "mongarsd.toml"), "--state-dir", str(blocker / "state")]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("mongarsd: error: cannot create the state directory") and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a directory to another user")
def test_root_refuses_a_state_dir_of_another_user(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state.mkdir()
    os.chown(state, 65534, 65534)
    assert run_init(state) == 1
    _, err = capsys.readouterr()
    assert "run as that user: runuser -u" in err and "Traceback" not in err
    assert list(state.iterdir()) == []


def test_missing_token_file_dir_is_a_clear_error(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_init(state, "--token-file", str(tmp_path / "nowhere" / "admin.token")) == 1
    _, err = capsys.readouterr()
    assert "cannot write the token file" in err and "Traceback" not in err
    assert live_admins(state) == []


def test_a_secret_that_cannot_be_stored_leaves_no_live_token(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(tmp: Path, path: Path, data: bytes, *, replace: bool) -> None:
        tmp.unlink()
        raise firstboot.InitError(f"cannot write the token file {path}: disk full")

    real = firstboot.publish_private_file
    monkeypatch.setattr(firstboot, "publish_private_file", fail)
    assert run_init(state) == 1
    assert "disk full" in capsys.readouterr().err
    assert live_admins(state) == []
    assert not [p.name for p in state.iterdir() if "admin.token" in p.name]

    monkeypatch.setattr(firstboot, "publish_private_file", real)
    assert run_init(state) == 0
    assert len(live_admins(state)) == 1


async def test_token_step_does_not_block_the_loop(tmp_path: Path) -> None:
    db = Database(path=tmp_path / DB_FILE)
    await db.async_start()
    try:
        first = await firstboot.async_ensure_admin_token(db, tmp_path / "admin.token")
        again = await firstboot.async_ensure_admin_token(db, tmp_path / "admin.token")
    finally:
        await db.async_stop()
    assert (first.state, again.state) == ("created", "exists") and first.token_id == again.token_id
