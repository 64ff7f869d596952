"""Social vault, validation and post journal: pure checks and files in a temp state dir."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
import structlog

from mongarsd.errors import NotFoundError, UnavailableError, ValidationError
from mongarsd.social import vault as vault_mod
from mongarsd.social.mastodon import (
    StatusDraft,
    backoff_s,
    scrub,
    validate_draft,
    validate_idempotency_key,
)
from mongarsd.social.service import JournalRecord, PostJournal
from mongarsd.social.vault import (
    KEY_BYTES,
    AccountInfo,
    Vault,
    VaultError,
    create_key_file,
    validate_instance,
    validate_name,
    validate_token,
)

TOKEN = "tok-SeCrEt-0123456789abcdefghijklmnopqrstuvwxyz"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "main", "my.bot_2", "x" * 64, "0-day"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-x", ".x", "_x", "x" * 65, "has space", "é", "a/b", 3])
def test_invalid_names_are_refused_naming_the_rule(name: object) -> None:
    with pytest.raises(ValidationError) as err:
        validate_name(name)
    assert err.value.param == "name"


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://Mastodon.Example/", "https://mastodon.example"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("HTTPS://social.example/sub/path/", "https://social.example/sub/path"),
        ("https://[::1]:443", "https://[::1]:443"),
    ],
)
def test_instance_urls_are_normalised(url: str, normal: str) -> None:
    assert validate_instance(url) == normal


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.org", "https://"),
        ("mastodon.example", "https://"),
        ("https://user:pw@example.org", "user name or password"),
        ("https://user@example.org", "user name or password"),
        ("https://example.org/?x=1", "query"),
        ("https://example.org/#top", "fragment"),
        ("https://", "no host"),
        ("https://exa mple.org", "spaces"),
        ("https://example.org:99999", "not a valid URL"),
        ("", "base URL"),
    ],
)
def test_bad_instance_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_instance(url)
    assert why in str(err.value) and err.value.param == "instance"


def test_token_validation_never_echoes_the_token() -> None:
    assert validate_token(f"  {TOKEN}\n") == TOKEN
    for bad in ("", "   ", "two words" + TOKEN, TOKEN + "\r\nX-Evil: 1", "x" * 2000):
        with pytest.raises(ValidationError) as err:
            validate_token(bad)
        assert TOKEN not in str(err.value) and "two words" not in str(err.value)


def test_draft_limits_and_fields() -> None:
    d = validate_draft("hello", max_chars=500)
    assert d == StatusDraft("hello", "public", None, None)
    assert d.payload() == {"status": "hello", "visibility": "public"}
    with pytest.raises(ValidationError, match="at most 5"):
        validate_draft("123456", max_chars=5)
    with pytest.raises(ValidationError, match="together"):
        validate_draft("1234", spoiler_text="cw", max_chars=5)
    with pytest.raises(ValidationError) as err:
        validate_draft("x", visibility="friends", max_chars=5)
    assert err.value.param == "visibility"
    with pytest.raises(ValidationError) as err:
        validate_draft("x", language="english", max_chars=5)
    assert err.value.param == "language"
    with pytest.raises(ValidationError, match="empty"):
        validate_draft("  \n", max_chars=5)
    full = validate_draft("hi", visibility="unlisted", spoiler_text="cw", language="fr", max_chars=5)
    assert full.payload() == {"status": "hi", "visibility": "unlisted", "spoiler_text": "cw", "language": "fr"}
    # one key may not stand for two posts: the fingerprint tells them apart
    assert full.fingerprint() != validate_draft("hi", visibility="public", spoiler_text="cw", language="fr", max_chars=5).fingerprint()
    assert full.fingerprint() == validate_draft("hi", visibility="unlisted", spoiler_text="cw", language="fr", max_chars=5).fingerprint()


def test_idempotency_keys() -> None:
    assert validate_idempotency_key("0b6a3c1e-key") == "0b6a3c1e-key"
    for bad in ("", "has space", "x" * 129, "line\nbreak", 5):
        with pytest.raises(ValidationError):
            validate_idempotency_key(bad)


def test_scrub_and_backoff() -> None:
    assert scrub(f"invalid token {TOKEN}\n\x1b[31m", TOKEN) == "invalid token [token] [31m"
    assert len(scrub("e" * 1000, TOKEN)) == 303
    assert [backoff_s(a, 0.5) for a in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, 4.0]


# --- the vault -------------------------------------------------------------------------------


def test_first_use_creates_a_private_key_and_vault_without_clear_token(tmp_path: Path) -> None:
    v = Vault(tmp_path / "state", wall_clock=lambda: 1000.0)
    assert not v.key_path.exists()
    info, replaced = v.add("main", "https://Social.Example/", TOKEN)
    assert info == AccountInfo("main", "https://social.example", 1000.0, 500) and not replaced
    assert _mode(v.dir) == 0o700
    assert _mode(v.key_path) == 0o600 and v.key_path.stat().st_size == KEY_BYTES
    assert _mode(v.path) == 0o600
    raw = v.path.read_bytes()
    assert TOKEN.encode() not in raw
    assert base64.b64encode(TOKEN.encode()) not in raw
    assert TOKEN.encode() not in v.key_path.read_bytes()
    doc = json.loads(raw)
    assert [a["name"] for a in doc["accounts"]] == ["main"]
    # listing never hands out a token
    assert [i.public() for i in v.list()] == [
        {"name": "main", "instance": "https://social.example", "created_at": 1000.0, "max_chars": 500}
    ]
    assert TOKEN not in json.dumps([i.public() for i in v.list()])
    creds = v.credentials("main")
    assert creds.token == TOKEN and v.get_token("main") == TOKEN
    assert TOKEN not in repr(creds)  # a logged or traced Credentials never shows it


def test_key_is_read_once_per_process_not_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = vault_mod.read_key_file

    def counting(path: Path) -> bytes:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(vault_mod, "read_key_file", counting)
    v = Vault(tmp_path)
    v.add("a", "https://a.example", TOKEN)
    first_use = len(reads)  # a look for the key, then a read of the one just created
    assert first_use == 2
    v.add("b", "https://b.example", TOKEN + "b")
    for _ in range(20):
        assert v.get_token("a") == TOKEN
    assert len(reads) == first_use
    # another process (a new Vault) reads the same key once and opens the same tokens
    other = Vault(tmp_path)
    for _ in range(5):
        assert other.get_token("b") == TOKEN + "b"
    assert len(reads) == first_use + 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    os.chmod(v.key_path, 0o644)
    with pytest.raises(VaultError, match=r"mode 0644.*must be 0600") as err:
        Vault(tmp_path).get_token("main")
    assert isinstance(err.value, UnavailableError)  # the API answers 503 with the message
    assert TOKEN not in str(err.value)


def test_a_key_of_the_wrong_size_or_a_link_is_refused(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    key = v.key_path.read_bytes()
    v.key_path.write_bytes(key + b"\n")
    with pytest.raises(VaultError, match="33 bytes; a vault key is exactly 32"):
        Vault(tmp_path).get_token("main")
    v.key_path.unlink()
    (v.dir / "elsewhere").write_bytes(key)
    os.chmod(v.dir / "elsewhere", 0o600)
    v.key_path.symlink_to(v.dir / "elsewhere")
    with pytest.raises(VaultError, match="not a link"):
        Vault(tmp_path).get_token("main")


def test_a_missing_key_with_stored_accounts_is_not_silently_replaced(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    v.key_path.unlink()
    with pytest.raises(VaultError, match="missing"):
        Vault(tmp_path).get_token("main")
    with pytest.raises(VaultError, match="restore the key"):
        Vault(tmp_path).add("other", "https://social.example", TOKEN)
    assert not v.key_path.exists()


def test_another_key_cannot_open_the_tokens(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    v.key_path.unlink()
    create_key_file(v.key_path)
    with pytest.raises(VaultError, match="cannot be opened"):
        Vault(tmp_path).get_token("main")


def test_an_edited_instance_does_not_send_the_token_elsewhere(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    v.add("other", "https://other.example", "other-token")
    doc = json.loads(v.path.read_bytes())
    doc["accounts"][0]["instance"] = "https://attacker.example"
    v.path.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="another account or instance"):
        v.credentials("main")
    # swapping sealed tokens between accounts is caught the same way
    doc = json.loads(v.path.read_bytes())
    doc["accounts"][0]["instance"] = "https://social.example"
    doc["accounts"][0]["token"], doc["accounts"][1]["token"] = doc["accounts"][1]["token"], doc["accounts"][0]["token"]
    v.path.write_text(json.dumps(doc))
    with pytest.raises(VaultError, match="another account or instance"):
        v.credentials("main")


def test_create_key_file_keeps_a_key_made_first(tmp_path: Path) -> None:
    path = tmp_path / "vault.key"
    create_key_file(path)
    first = path.read_bytes()
    create_key_file(path)  # a second process racing the first
    assert path.read_bytes() == first and len(first) == KEY_BYTES
    assert [p.name for p in tmp_path.iterdir()] == ["vault.key"]  # no temporary left behind


def test_add_replace_remove(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN, max_chars=1000)
    with pytest.raises(ValidationError) as err:
        v.add("main", "https://social.example", TOKEN)
    assert err.value.status == 409
    info, replaced = v.add("main", "https://new.example", "new-token", replace=True)
    assert replaced and info.instance == "https://new.example" and info.max_chars == 500
    assert v.get_token("main") == "new-token"
    assert v.remove("main").name == "main"
    assert v.list() == []
    with pytest.raises(NotFoundError):
        v.remove("main")
    with pytest.raises(NotFoundError) as nf:
        v.get_token("main")
    assert nf.value.param == "account"
    with pytest.raises(ValidationError):
        v.add("main", "https://social.example", TOKEN, max_chars=0)


def test_a_damaged_vault_file_is_reported(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    v.add("main", "https://social.example", TOKEN)
    v.path.write_text("{not json")
    with pytest.raises(VaultError, match="damaged"):
        v.list()


def test_a_loose_social_dir_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "social"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with structlog.testing.capture_logs() as logs:
        Vault(tmp_path).add("main", "https://social.example", TOKEN)
    assert _mode(d) == 0o700
    assert any(e["event"] == "social_dir_mode_tightened" for e in logs)
    assert TOKEN not in repr(logs)


# --- the post journal ------------------------------------------------------------------------


def _rec(key: str, account: str = "main", fp: str = "f") -> JournalRecord:
    return JournalRecord(account, key, fp, "id-" + key, "https://s.example/@me/" + key, "2024-01-01T00:00:00Z", 1.0)


def test_journal_is_shared_between_processes_through_the_file(tmp_path: Path) -> None:
    a = PostJournal(tmp_path / "posts.jsonl", tmp_path / ".lock")
    b = PostJournal(tmp_path / "posts.jsonl", tmp_path / ".lock")
    b.refresh()
    assert b.get("main", "k1") is None
    a.append(_rec("k1"))
    assert a.get("main", "k1") == _rec("k1")
    b.refresh()
    assert b.get("main", "k1") == _rec("k1")
    assert b.get("other", "k1") is None  # keys are per account
    assert _mode(tmp_path / "posts.jsonl") == 0o600


def test_journal_skips_bad_lines_and_waits_for_partial_ones(tmp_path: Path) -> None:
    path = tmp_path / "posts.jsonl"
    record = json.dumps(dict(zip(_FIELDS, _values("k2"), strict=True)))
    path.write_text('{"account": "main"}\nnot json\n' + record + "\n" + '{"acc')
    j = PostJournal(path, tmp_path / ".lock")
    j.refresh()
    assert j.skipped == 2 and len(j) == 1 and j.get("main", "k2") is not None
    with path.open("a") as fh:  # the partial line completes later
        fh.write('ount": "x"}\n')
    j.refresh()
    assert j.skipped == 3 and len(j) == 1


_FIELDS = ("account", "key", "fingerprint", "id", "url", "created_at", "posted_at")


def _values(key: str) -> tuple[object, ...]:
    r = _rec(key)
    return (r.account, r.key, r.fingerprint, r.id, r.url, r.created_at, r.posted_at)


def test_journal_is_bounded_and_compacted(tmp_path: Path) -> None:
    j = PostJournal(tmp_path / "posts.jsonl", tmp_path / ".lock", max_entries=5)
    for i in range(23):
        j.append(_rec(f"k{i}"))
    assert len(j) == 5
    assert j.get("main", "k0") is None and j.get("main", "k22") is not None
    lines = (tmp_path / "posts.jsonl").read_text().splitlines()
    assert len(lines) <= 10  # compacted at twice the bound
    fresh = PostJournal(tmp_path / "posts.jsonl", tmp_path / ".lock", max_entries=5)
    fresh.refresh()
    assert fresh.get("main", "k22") == _rec("k22")


def test_plain_http_to_a_remote_instance_is_warned_about(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    with structlog.testing.capture_logs() as logs:
        v.add("local", "http://127.0.0.1:3000", TOKEN)
        v.add("remote", "http://social.example", TOKEN)
    warned = [e["account"] for e in logs if e["event"] == "social_instance_not_https"]
    assert warned == ["remote"]
    assert TOKEN not in repr(logs)
