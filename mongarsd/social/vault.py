"""Credentials vault: social account tokens sealed with NaCl SecretBox under a key file.

Files under the state dir:

    social/             0700
    social/vault.key    32 random bytes, 0600, created atomically on first use
    social/vault.json   accounts (name, instance, created_at, max_chars) and each token sealed

The original re-derived its Fernet key with PBKDF2 (390 000 iterations, a static salt) on every
encrypt and decrypt, seconds per call on a small board. Here the key is random, so there is
nothing to derive: it is read once per process and kept. Each sealed token also carries its
account name and instance URL, so a vault.json edited to send a token to another host (or to
swap two accounts' tokens) fails to open instead of leaking the token.

Every method of Vault blocks (file I/O, flock): call it from a thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nacl.exceptions
import nacl.secret
import nacl.utils
import structlog

from mongarsd.errors import NotFoundError, UnavailableError, ValidationError
from mongarsd.fsutil import atomic_write_private, write_all
from mongarsd.principal import is_loopback_host

log = structlog.get_logger("mongarsd.social")

SOCIAL_DIR: Final = "social"
KEY_FILE: Final = "vault.key"
VAULT_FILE: Final = "vault.json"
LOCK_FILE: Final = ".lock"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
STATE_DIR_MODE: Final = 0o750  # as `mongarsd init` creates it
KEY_BYTES: Final = nacl.secret.SecretBox.KEY_SIZE  # 32
VAULT_VERSION: Final = 1
SEAL_VERSION: Final = 1
MAX_VAULT_BYTES: Final = 1 << 20  # a vault of MAX_ACCOUNTS accounts is a few tens of KiB
MAX_ACCOUNTS: Final = 64
MAX_TOKEN_CHARS: Final = 1024  # Mastodon tokens are 43 characters
MAX_URL_CHARS: Final = 2048
DEFAULT_MAX_CHARS: Final = 500  # Mastodon's default status length
MAX_MAX_CHARS: Final = 100_000
NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# A bearer token goes into an HTTP header: visible ASCII only (no space, CR, LF).
TOKEN_RE: Final = re.compile(r"[\x21-\x7e]+")


class VaultError(UnavailableError):
    """The vault's key or file is missing, unsafe or damaged; an operator has to fix it."""


@dataclasses.dataclass(frozen=True, slots=True)
class AccountInfo:
    """A stored account without its token."""

    name: str
    instance: str
    created_at: float
    max_chars: int = DEFAULT_MAX_CHARS

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "instance": self.instance, "created_at": self.created_at, "max_chars": self.max_chars}


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """An account and its clear token; the token never appears in repr (logs, tracebacks)."""

    account: AccountInfo
    token: str = dataclasses.field(repr=False)


# --- validation (pure) ----------------------------------------------------------------------


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def validate_name(name: object, *, param: str = "name") -> str:
    """Return a valid account name or raise ValidationError saying what is wrong (pure)."""
    if not isinstance(name, str):
        raise ValidationError(f"'{param}' must be a string", param=param)
    if not NAME_RE.fullmatch(name):
        raise ValidationError(
            f"account name {_shown(name)} is invalid: use 1 to 64 characters from a-z, 0-9, '_', '.' and '-', "
            "starting with a letter or digit",
            param=param,
        )
    return name


def validate_instance(url: object, *, param: str = "instance") -> str:
    """Return the instance base URL normalised (lower-case scheme and host, no trailing slash) (pure)."""
    if not isinstance(url, str) or not url.strip():
        raise ValidationError(f"'{param}' must be the instance's base URL, e.g. https://mastodon.example", param=param)
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise ValidationError(f"'{param}' is too long ({len(url)} characters; at most {MAX_URL_CHARS})", param=param)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValidationError(f"'{param}' must not contain spaces or control characters", param=param)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ValidationError(f"'{param}' {_shown(url)} is not a valid URL: {err}", param=param) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValidationError(f"'{param}' must start with https:// (or http://), got {_shown(url)}", param=param)
    if not parts.hostname:
        raise ValidationError(f"'{param}' {_shown(url)} has no host", param=param)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValidationError(f"'{param}' must not carry a user name or password; the token is given separately", param=param)
    if parts.query or url.rstrip("/").endswith("?"):
        raise ValidationError(f"'{param}' must not have a query string (?...); give the instance's base URL", param=param)
    if parts.fragment or "#" in url:
        raise ValidationError(f"'{param}' must not have a fragment (#...); give the instance's base URL", param=param)
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def validate_token(token: object, *, param: str = "token") -> str:
    """Return the token stripped of surrounding whitespace; errors never echo it (pure)."""
    if not isinstance(token, str):
        raise ValidationError(f"'{param}' must be a string", param=param)
    token = token.strip()
    if not token:
        raise ValidationError(f"'{param}' must not be empty", param=param)
    if len(token) > MAX_TOKEN_CHARS:
        raise ValidationError(f"'{param}' is too long ({len(token)} characters; at most {MAX_TOKEN_CHARS})", param=param)
    if not TOKEN_RE.fullmatch(token):
        raise ValidationError(f"'{param}' must be visible ASCII characters only (no spaces or line breaks inside)", param=param)
    return token


def validate_max_chars(value: object, *, param: str = "max_chars") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MAX_CHARS:
        raise ValidationError(f"'{param}' must be an integer between 1 and {MAX_MAX_CHARS}", param=param)
    return value


# --- files (blocking) -----------------------------------------------------------------------


def social_dir(state_dir: Path) -> Path:
    return Path(state_dir) / SOCIAL_DIR


def ensure_private_dir(path: Path) -> None:
    """Create `path` (0700) when missing, tighten it when others can read it (blocking)."""
    try:
        path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        st = os.lstat(path)
    except OSError as err:
        raise VaultError(f"cannot create the social directory {path}: {err.strerror or err}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise VaultError(f"{path} is not a directory (a symbolic link or a file is in the way)")
    if st.st_uid != os.geteuid():
        raise VaultError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); run as the daemon's user")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        try:
            os.chmod(path, DIR_MODE)
        except OSError as err:
            raise VaultError(f"cannot set mode 0700 on {path}: {err.strerror or err}") from err
        log.warning("social_dir_mode_tightened", path=str(path), was=oct(stat.S_IMODE(st.st_mode)))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600) across processes (blocking)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as err:
        raise VaultError(f"cannot open the lock file {path}: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_key_file(path: Path) -> bytes:
    """Read a vault key, refusing one that others can read, of the wrong size or not ours (blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise VaultError(f"cannot open the vault key {path}: {err.strerror or err} (it must be a plain file, not a link)") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VaultError(f"the vault key {path} is not a plain file")
        if st.st_uid != os.geteuid():
            raise VaultError(f"the vault key {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise VaultError(
                f"the vault key {path} has mode {mode:04o}: others may read it; it must be 0600 "
                f"(run `chmod 600 {path}`, and consider the stored tokens exposed)"
            )
        if st.st_size != KEY_BYTES:
            raise VaultError(
                f"the vault key {path} is {st.st_size} bytes; a vault key is exactly {KEY_BYTES} bytes: "
                "restore it from a backup (without it the stored tokens cannot be read)"
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise VaultError(f"the vault key {path} could not be read whole ({len(data)} of {KEY_BYTES} bytes)")
    return data


def create_key_file(path: Path) -> None:
    """Write 32 random bytes to `path` (0600) atomically, keeping a key another process made first (blocking)."""
    key = nacl.utils.random(KEY_BYTES)
    # mkstemp opens O_CREAT|O_EXCL with mode 0600: the key is never readable by others.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, key)
        finally:
            os.close(fd)
        try:
            # link(2) never replaces an existing name: a key another process created meanwhile wins.
            os.link(tmp, path)
        except FileExistsError:
            pass
    except OSError as err:
        raise VaultError(f"cannot create the vault key {path}: {err.strerror or err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the vault ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Entry:
    info: AccountInfo
    sealed: str  # base64 of SecretBox(nonce + ciphertext)


class Vault:
    """Social accounts with their tokens sealed at rest; every method blocks (run it in a thread)."""

    def __init__(self, state_dir: Path, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.dir = social_dir(state_dir)
        self.key_path = self.dir / KEY_FILE
        self.path = self.dir / VAULT_FILE
        self.lock_path = self.dir / LOCK_FILE
        self._wall_clock = wall_clock
        self._box: nacl.secret.SecretBox | None = None
        self._box_lock = threading.Lock()

    # key: loaded (or created) once per process, then kept

    def _secret_box(self, *, create: bool) -> nacl.secret.SecretBox:
        with self._box_lock:
            if self._box is not None:
                return self._box
            ensure_private_dir(self.dir)
            try:
                key = read_key_file(self.key_path)
            except FileNotFoundError:
                if not create:
                    raise VaultError(f"the vault key {self.key_path} is missing; the stored tokens cannot be read") from None
                if self._read_entries():
                    # A fresh key could never open the tokens already stored: refuse rather than lose them silently.
                    raise VaultError(
                        f"the vault key {self.key_path} is missing but {self.path} holds accounts: restore the key "
                        f"from a backup, or remove {self.path} and add the accounts again"
                    ) from None
                create_key_file(self.key_path)
                key = read_key_file(self.key_path)
                log.info("social_vault_key_created", path=str(self.key_path))
            self._box = nacl.secret.SecretBox(key)
            return self._box

    # vault.json

    def _read_entries(self) -> dict[str, _Entry]:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(MAX_VAULT_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise VaultError(f"cannot read the vault {self.path}: {err.strerror or err}") from err
        if len(raw) > MAX_VAULT_BYTES:
            raise VaultError(f"the vault {self.path} is larger than {MAX_VAULT_BYTES} bytes; it is not a mongarsd vault")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != VAULT_VERSION or not isinstance(doc.get("accounts"), list):
                raise ValueError("not a version 1 vault")
            entries: dict[str, _Entry] = {}
            for item in doc["accounts"]:
                name = validate_name(item["name"])
                info = AccountInfo(
                    name=name,
                    instance=validate_instance(item["instance"]),
                    created_at=float(item["created_at"]),
                    max_chars=validate_max_chars(item.get("max_chars", DEFAULT_MAX_CHARS)),
                )
                sealed = item["token"]
                if not isinstance(sealed, str):
                    raise ValueError("a token is not a string")
                entries[name] = _Entry(info, sealed)
        except (ValueError, KeyError, TypeError, ValidationError) as err:
            raise VaultError(f"the vault {self.path} is damaged ({err}); restore it from a backup or remove it") from None
        return entries

    def _write_entries(self, entries: dict[str, _Entry]) -> None:
        doc = {
            "version": VAULT_VERSION,
            "accounts": [{**e.info.public(), "token": e.sealed} for _, e in sorted(entries.items())],
        }
        try:
            atomic_write_private(self.path, json.dumps(doc, indent=1).encode("utf-8") + b"\n")
        except OSError as err:
            raise VaultError(f"cannot write the vault {self.path}: {err.strerror or err}") from err

    @staticmethod
    def _plaintext(info: AccountInfo, token: str) -> bytes:
        return json.dumps({"v": SEAL_VERSION, "account": info.name, "instance": info.instance, "token": token}).encode("utf-8")

    def _seal(self, info: AccountInfo, token: str) -> str:
        box = self._secret_box(create=True)
        return base64.b64encode(bytes(box.encrypt(self._plaintext(info, token)))).decode("ascii")

    def _open(self, entry: _Entry) -> str:
        box = self._secret_box(create=False)
        name = entry.info.name
        try:
            doc = json.loads(box.decrypt(base64.b64decode(entry.sealed, validate=True)))
            token = doc["token"] if isinstance(doc, dict) else None
        except (nacl.exceptions.CryptoError, binascii.Error, ValueError, KeyError, TypeError):
            raise VaultError(
                f"the token of account {name!r} cannot be opened: {self.key_path} does not match {self.path}, "
                "or the entry was altered; add the account again with its token"
            ) from None
        if doc.get("account") != name or doc.get("instance") != entry.info.instance or not isinstance(token, str):
            raise VaultError(
                f"the sealed token of account {name!r} belongs to another account or instance (was {self.path} edited?); "
                "add the account again with its token"
            )
        return token

    # public operations

    def add(self, name: str, instance: str, token: str, *, max_chars: int | None = None, replace: bool = False) -> tuple[AccountInfo, bool]:
        """Store an account (validated) with its token sealed; return it and whether it replaced one."""
        name = validate_name(name)
        instance = validate_instance(instance)
        token = validate_token(token)
        max_chars = DEFAULT_MAX_CHARS if max_chars is None else validate_max_chars(max_chars)
        ensure_private_dir(self.dir)
        with file_lock(self.lock_path):
            entries = self._read_entries()
            replaced = name in entries
            if replaced and not replace:
                raise ValidationError(f"account {name!r} already exists; remove it first or replace it", param="name", status=409)
            if not replaced and len(entries) >= MAX_ACCOUNTS:
                raise ValidationError(f"the vault holds {MAX_ACCOUNTS} accounts already (the most it keeps)", param="name", status=409)
            info = AccountInfo(name=name, instance=instance, created_at=round(float(self._wall_clock()), 3), max_chars=max_chars)
            entries[name] = _Entry(info, self._seal(info, token))
            self._write_entries(entries)
        log.info("social_account_added", account=name, instance=instance, replaced=replaced)
        if instance.startswith("http://") and not is_loopback_host(urlsplit(instance).hostname or ""):
            log.warning("social_instance_not_https", account=name, instance=instance, hint="the token crosses the network in clear")
        return info, replaced

    def list(self) -> list[AccountInfo]:
        """Return every account, by name; never a token."""
        return [e.info for _, e in sorted(self._read_entries().items())]

    def get(self, name: str) -> AccountInfo:
        return self._entry(name).info

    def _entry(self, name: str) -> _Entry:
        name = validate_name(name, param="account")
        entry = self._read_entries().get(name)
        if entry is None:
            raise NotFoundError(f"no social account named {name!r} (add one with `mongarsd social add`)", param="account")
        return entry

    def credentials(self, name: str) -> Credentials:
        """Return an account with its clear token (read and opened in one go)."""
        entry = self._entry(name)
        return Credentials(entry.info, self._open(entry))

    def get_token(self, name: str) -> str:
        return self.credentials(name).token

    def remove(self, name: str) -> AccountInfo:
        """Forget an account and its token."""
        name = validate_name(name)
        if not self.path.exists():
            raise NotFoundError(f"no social account named {name!r}", param="name")
        with file_lock(self.lock_path):
            entries = self._read_entries()
            entry = entries.pop(name, None)
            if entry is None:
                raise NotFoundError(f"no social account named {name!r}", param="name")
            self._write_entries(entries)
        log.info("social_account_removed", account=name)
        return entry.info
