"""Packet and frame encryption (XChaCha20-Poly1305), replay window and bad-packet accounting.

Envelope: version (1 byte) | key id (4) | nonce (24) | ciphertext+tag.
Associated data: version byte + cluster label, so a packet from another cluster (or another
protocol version) fails authentication even with the same key. The nonce's first 8 bytes are
the sender's wall clock in milliseconds and the other 16 are random: receivers drop packets
outside the clock-skew bound and nonces seen before (replays).
"""

from __future__ import annotations

import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from mongarsd.errors import WireError
from mongarsd.mesh import const
from mongarsd.mesh.keyring import Keyring

log = structlog.get_logger("mongarsd.mesh.security")

_TS = struct.Struct(">Q")
_HEADER_BYTES = 1 + const.KEY_ID_BYTES + const.NONCE_BYTES

DROP_REASONS = (
    "too_large",
    "malformed",
    "bad_version",
    "unknown_key",
    "decrypt_failed",
    "replay",
    "stale",
    "bad_signature",
    "bad_identity",
    "revoked",
    "unknown_node",
    "queue_full",
)


class DropError(WireError):
    """A packet was rejected; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


class ReplayWindow:
    """Remember nonces within the clock-skew window and refuse repeats and stale packets.

    One window for all senders: source addresses are spoofable, so a per-address window would
    let a replay through from another address; nonces are unique per packet cluster-wide.
    Memory is bounded: when full, the oldest entries are evicted and the acceptance floor is
    raised to their timestamp, so an evicted nonce can never be accepted again.
    """

    def __init__(
        self,
        *,
        max_skew_s: float = const.MAX_CLOCK_SKEW_S,
        max_entries: int = const.REPLAY_CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_skew_ms = int(max_skew_s * 1000)
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> ts, insertion order
        self._floor_ms = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: bytes) -> str | None:
        """Record the nonce; return None if fresh, or "stale"/"replay"."""
        ts_ms = _TS.unpack_from(nonce)[0]
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - ts_ms) > self._max_skew_ms or ts_ms <= self._floor_ms:
            return "stale"
        if nonce in self._seen:
            return "replay"
        self._expire(now_ms)
        self._seen[nonce] = ts_ms
        return None

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self._max_skew_ms
        # Insertion order is arrival order; timestamps are roughly ordered, so expiring from
        # the front is amortised O(1). Out-of-order old entries expire when they reach the front.
        while self._seen:
            nonce, ts = next(iter(self._seen.items()))
            if ts >= horizon and len(self._seen) < self._max_entries:
                break
            del self._seen[nonce]
            if ts >= horizon:  # evicted for room, not age: refuse anything not newer
                self._floor_ms = max(self._floor_ms, ts)


class DropLog:
    """Count dropped packets by reason; log each (reason, peer) at most once per interval."""

    def __init__(
        self,
        *,
        interval_s: float = const.BAD_PACKET_LOG_INTERVAL_S,
        max_keys: int = const.BAD_PACKET_LOG_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: dict[str, int] = {}
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def record(self, reason: str, peer: object, detail: str = "") -> None:
        """Count a drop and maybe log it (rate-limited, bounded memory)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        key = (reason, str(peer))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            return
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        log.warning(
            "mesh_packet_dropped",
            reason=reason,
            peer=str(peer),
            detail=detail,
            total=self.counts[reason],
        )


class Cipher:
    """Seal and open packets/frames with the cluster keyring and label."""

    def __init__(
        self,
        *,
        keyring: Keyring,
        cluster_label: str,
        replay: ReplayWindow | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        label = cluster_label.encode("utf-8")
        if len(label) > const.MAX_CLUSTER_LABEL_BYTES:
            raise WireError("cluster label too long")
        self.keyring = keyring
        self._aad = bytes([const.PROTOCOL_VERSION]) + label
        self._replay = replay if replay is not None else ReplayWindow(clock=clock)
        self._clock = clock

    def seal(self, plaintext: bytes, *, max_bytes: int = const.MAX_UDP_PACKET_BYTES) -> bytes:
        """Encrypt with the primary key; raise WireError if the result exceeds `max_bytes`."""
        if len(plaintext) + const.ENVELOPE_OVERHEAD_BYTES > max_bytes:
            raise WireError("plaintext too large for the envelope cap")
        nonce = _TS.pack(int(self._clock() * 1000)) + secrets.token_bytes(const.NONCE_BYTES - 8)
        ct = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, self._aad, nonce, self.keyring.primary_key)
        return bytes([const.PROTOCOL_VERSION]) + self.keyring.primary_key_id + nonce + ct

    def open(self, packet: bytes, *, max_bytes: int = const.MAX_UDP_PACKET_BYTES) -> bytes:
        """Authenticate and decrypt; raise DropError(reason) on anything wrong."""
        if len(packet) > max_bytes:
            raise DropError("too_large")
        if len(packet) < const.ENVELOPE_OVERHEAD_BYTES:
            raise DropError("malformed", "shorter than the envelope")
        if packet[0] != const.PROTOCOL_VERSION:
            raise DropError("bad_version")
        kid = packet[1 : 1 + const.KEY_ID_BYTES]
        key = self.keyring.lookup(kid)
        if key is None:
            raise DropError("unknown_key")
        nonce = packet[1 + const.KEY_ID_BYTES : _HEADER_BYTES]
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(packet[_HEADER_BYTES:], self._aad, nonce, key)
        except CryptoError as err:
            raise DropError("decrypt_failed") from err
        # Only authenticated nonces enter the replay window (no cache pollution by forgeries).
        verdict = self._replay.check(nonce)
        if verdict is not None:
            raise DropError(verdict)
        return bytes(plaintext)
