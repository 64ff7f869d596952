"""Cluster keyring: one primary key that encrypts, secondary keys that still decrypt.

Rotation is Serf style: `install` a new key everywhere, `use` it everywhere, then `remove` the
old one. Removing the primary key is refused. Keys are persisted as base64 in a 0600 JSON file
with an atomic write. A key id is the first 4 bytes of BLAKE2b(key): it selects the key on
receive and is safe to publish (mDNS TXT `ck`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import structlog
from nacl.encoding import RawEncoder
from nacl.hash import blake2b

from mongarsd.errors import MeshError
from mongarsd.fsutil import atomic_write_private
from mongarsd.mesh import const

log = structlog.get_logger("mongarsd.mesh")

KEYRING_POLL_S: Final = 2.0  # `mongarsd keys ...` edits the file; a running mesh follows within this


class KeyringError(MeshError):
    """A keyring operation is invalid or its file is unreadable."""


def key_id(key: bytes) -> bytes:
    """Return the 4-byte id of a cluster key (first bytes of its BLAKE2b digest)."""
    return blake2b(key, digest_size=32, encoder=RawEncoder)[: const.KEY_ID_BYTES]


def generate_key() -> bytes:
    """Return a fresh random 32-byte cluster key."""
    return secrets.token_bytes(const.KEY_BYTES)


def decode_key(text: str) -> bytes:
    """Decode a base64 cluster key, checking its length."""
    try:
        key = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise KeyringError("key is not valid base64") from err
    if len(key) != const.KEY_BYTES:
        raise KeyringError(f"key must be {const.KEY_BYTES} bytes, got {len(key)}")
    return key


def encode_key(key: bytes) -> str:
    """Encode a cluster key as base64 text."""
    return base64.b64encode(key).decode("ascii")


def _check(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != const.KEY_BYTES:
        raise KeyringError(f"key must be {const.KEY_BYTES} bytes")
    return key


class Keyring:
    """The set of cluster keys; the primary one encrypts, every one decrypts."""

    def __init__(self, primary: bytes, secondaries: tuple[bytes, ...] = ()) -> None:
        self._primary = _check(primary)
        self._keys: dict[bytes, bytes] = {key_id(self._primary): self._primary}
        self._primary_id = (self._primary, key_id(self._primary))  # sealing asks for it on every packet
        for key in secondaries:
            self._keys[key_id(_check(key))] = key

    @property
    def primary_key(self) -> bytes:
        return self._primary

    @property
    def primary_key_id(self) -> bytes:
        key, kid = self._primary_id
        if key is not self._primary:
            self._primary_id = (self._primary, key_id(self._primary))
            kid = self._primary_id[1]
        return kid

    def keys(self) -> list[bytes]:
        """Return all keys, primary first."""
        return [self._primary] + [k for k in self._keys.values() if k != self._primary]

    def lookup(self, kid: bytes) -> bytes | None:
        """Return the key with this id, if installed."""
        return self._keys.get(kid)

    def install(self, key: bytes) -> None:
        """Add a key that decrypts (and may later become primary)."""
        self._keys[key_id(_check(key))] = key

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (encrypting) key."""
        kid = key_id(_check(key))
        if self._keys.get(kid) != key:
            raise KeyringError("key is not installed")
        self._primary = key

    def remove(self, key: bytes) -> None:
        """Remove a secondary key; removing the primary key is refused."""
        kid = key_id(_check(key))
        if key == self._primary:
            raise KeyringError("refusing to remove the primary key; use another key first")
        if kid not in self._keys:
            raise KeyringError("key is not installed")
        del self._keys[kid]

    def replace_with(self, other: Keyring) -> bool:
        """Take another keyring's keys in place (the cipher holds this object); True when anything changed."""
        if other._primary == self._primary and other._keys == self._keys:
            return False
        self._primary = other._primary
        self._keys = dict(other._keys)
        return True

    def to_json(self) -> bytes:
        """Serialise the keyring (primary first)."""
        doc = {"primary": encode_key(self._primary), "keys": [encode_key(k) for k in self.keys()]}
        return json.dumps(doc, indent=2).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Keyring:
        """Parse a keyring file's bytes."""
        try:
            doc = json.loads(data)
            primary = decode_key(doc["primary"])
            keys = tuple(decode_key(k) for k in doc.get("keys", []))
        except (ValueError, KeyError, TypeError) as err:
            raise KeyringError("keyring file is invalid") from err
        return cls(primary, tuple(k for k in keys if k != primary))

    def save(self, path: Path) -> None:
        """Persist the keyring to a 0600 file atomically (blocking; run in a thread)."""
        atomic_write_private(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Load a keyring file (blocking; run in a thread)."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise KeyringError(f"cannot read keyring {path}: {err.strerror}") from err
        return cls.from_json(data)

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        """Load the keyring, or create one with a fresh primary key (blocking; run in a thread)."""
        if path.exists():
            return cls.load(path)
        ring = cls(generate_key())
        ring.save(path)
        return ring


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """Return (mtime_ns, size) of a file, None when absent (blocking but instantaneous)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


async def async_watch_keyring(path: Path, keyring: Keyring, on_primary_change: Callable[[bytes], Awaitable[None]]) -> None:
    """Apply edits of the keyring file to the live keyring forever; call back when the primary key changes.

    A half-written or broken file is logged and skipped: the mesh keeps the keys it has.
    """
    last = await asyncio.to_thread(_file_stamp, path)
    while True:
        await asyncio.sleep(KEYRING_POLL_S)
        stamp = await asyncio.to_thread(_file_stamp, path)
        if stamp == last or stamp is None:
            continue
        last = stamp
        try:
            fresh = await asyncio.to_thread(Keyring.load, path)
        except MeshError as err:
            log.warning("keyring_reload_failed", path=str(path), error=str(err))
            continue
        old_primary = keyring.primary_key_id
        if not keyring.replace_with(fresh):
            continue
        log.info("keyring_reloaded", primary=keyring.primary_key_id.hex(), keys=len(keyring.keys()))
        if keyring.primary_key_id != old_primary:
            await on_primary_change(keyring.primary_key_id)
