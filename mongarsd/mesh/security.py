"""Packet and frame encryption (XChaCha20-Poly1305), replay protection and bad-packet accounting.

Envelope: version (1 byte) | key id (4) | nonce (24) | ciphertext+tag.
Associated data: version byte + cluster label, so a packet from another cluster (or another
protocol version) fails authentication even with the same key.

Nonce (issue 9, wire-compatible: version 1 receivers read bytes 0-7 and treat the rest as random):

    wall clock ms (8) | sender session (8) | "mg" (2) | position (6)

The session is random per Cipher (per process), the position strictly increases on the sender's
own monotonic clock (us). The AEAD authenticates the nonce, so only cluster members can mint a
stamp. Receivers refuse repeats and packets far behind their sender's newest one
(`SenderWindow`), which needs no agreement between wall clocks: a Pi that booted without an RTC
still joins, and its skew is logged. Nonces without the marker come from older senders and keep
the old rule: the wall clock within MAX_CLOCK_SKEW_S of ours, nonce never seen (`ReplayWindow`).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

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
# Stamped nonce layout (offsets in the 24-byte nonce).
_SESSION_AT: Final = 8
_MARKER_AT: Final = _SESSION_AT + const.NONCE_SESSION_BYTES
_POSITION_AT: Final = _MARKER_AT + len(const.NONCE_STAMP_MARKER)
_MAX_POSITION: Final = 2 ** (8 * const.NONCE_POSITION_BYTES) - 1
assert _POSITION_AT + const.NONCE_POSITION_BYTES == const.NONCE_BYTES

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
    """Remember unstamped nonces within the clock-skew window; refuse repeats and stale packets.

    Only for nonces from senders older than the stamped layout; wall clocks must agree.

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


if sys.platform == "linux":

    def boot_clock() -> float:
        """Return seconds since boot, suspend included; this clock never steps (CLOCK_BOOTTIME)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)

else:  # pragma: no cover - the daemon targets Linux

    def boot_clock() -> float:
        """Return seconds on the monotonic clock (no CLOCK_BOOTTIME on this platform)."""
        return time.monotonic()


@dataclass(slots=True)
class _Sender:
    high: int  # newest accepted position
    floor: int  # positions <= floor are refused; raised when a live entry is evicted for room


class SenderWindow:
    """Refuse repeated and too-old stamps, keyed on an authenticated sender session.

    A stamp is (session, position, uniq): the session names one sender timeline, the position is
    a point on that sender's own monotonic clock, `uniq` separates stamps minted at the same
    position (0 where positions are unique by construction). Only the sender's clock is used,
    never ours, so senders and receivers may disagree on the wall time by any amount.

    Invariant, per tracked session s, with floor(s) = max(s.floor, s.high - window):
    every stamp ever accepted for s is either still in `_seen` (refused as "replay") or has
    position <= floor(s) (refused as "stale"), and floor(s) never decreases while s is tracked.
    An entry leaves `_seen` only by expiry (position <= s.high - window) or by eviction for
    room, which first raises s.floor to its position. So a stamp is accepted at most once, even
    after its entry is gone, whatever address it comes from (addresses are not trusted; the
    session is inside the authenticated nonce or signature). Memory: `max_entries` stamps and
    `max_senders` sessions (LRU).

    Limit: the first stamp of a session we do not track (never seen, or forgotten after
    `max_senders` newer sessions) is trusted on first use; with clocks that may disagree there is
    nothing to tell it from a replay of an old capture. Such a replay is refused again as soon as
    the genuine sender's newest stamp reaches us: everything older than the window then falls
    below floor(s).
    """

    def __init__(
        self,
        *,
        window_s: float = const.REPLAY_WINDOW_S,
        max_entries: int = const.REPLAY_CACHE_MAX_ENTRIES,
        max_senders: int = const.REPLAY_MAX_SENDERS,
    ) -> None:
        self._window = int(window_s * 1_000_000)
        self._max_entries = max_entries
        self._max_senders = max_senders
        self._senders: OrderedDict[Hashable, _Sender] = OrderedDict()
        self._seen: OrderedDict[tuple[Hashable, int, int], None] = OrderedDict()  # arrival order

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def senders(self) -> int:
        """Return how many sender sessions are tracked."""
        return len(self._senders)

    def _floor(self, s: _Sender) -> int:
        return max(s.floor, s.high - self._window)

    def check(self, session: Hashable, position: int, uniq: int = 0) -> str | None:
        """Record an authenticated stamp; return None if fresh, or "stale"/"replay"."""
        key = (session, position, uniq)
        s = self._senders.get(session)
        if s is None:
            if key in self._seen:  # leftovers of a forgotten session still count
                return "replay"
            self._senders[session] = _Sender(high=position, floor=-1)
            while len(self._senders) > self._max_senders:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(session)
            if position <= self._floor(s):
                return "stale"
            if key in self._seen:
                return "replay"
            s.high = max(s.high, position)
        self._seen[key] = None
        self._expire()
        return None

    def _expire(self) -> None:
        # Arrival order is roughly position order per sender, so expiring from the front is
        # amortised O(1); an entry that expires out of order waits until it reaches the front.
        while self._seen:
            key = next(iter(self._seen))
            s = self._senders.get(key[0])
            # A forgotten session's entries stay until pushed out: they still catch its replays.
            live = s is None or key[1] > self._floor(s)
            if live and len(self._seen) <= self._max_entries:
                break
            del self._seen[key]
            if s is not None and live:  # evicted for room, not age: keep the invariant
                s.floor = key[1]


class ClockSkewLog:
    """Log a peer whose wall clock differs from ours beyond `bound_s`, once per interval per sender.

    The skew is tolerated (freshness uses `SenderWindow`), the log says why times look odd.
    """

    def __init__(
        self,
        *,
        bound_s: float = const.MAX_CLOCK_SKEW_S,
        interval_s: float = const.CLOCK_SKEW_LOG_INTERVAL_S,
        max_keys: int = const.BAD_PACKET_LOG_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bound_s = bound_s
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()

    def observe(self, key: str, skew_s: float, *, peer: str, **fields: str) -> bool:
        """Maybe log `skew_s` (peer's clock minus ours) for the sender `key`; return True if logged."""
        if abs(skew_s) <= self.bound_s:
            return False
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        log.warning(
            "mesh_peer_clock_skew",
            peer=peer,
            skew_s=round(skew_s, 3),
            bound_s=self.bound_s,
            tolerated=True,
            detail="peer's wall clock differs from ours; replay protection does not depend on it",
            **fields,
        )
        return True


_STA_UNSYNC: Final = 0x0040  # <sys/timex.h>


class _Timex(ctypes.Structure):
    # The head of struct timex in the C `long` ABI of the `adjtimex` symbol; the padding keeps
    # the kernel's writes inside our buffer whatever the tail looks like on this architecture.
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_tail", ctypes.c_byte * 512),
    )


def clock_synchronized(*, marker_path: str = const.TIMESYNC_MARKER_PATH) -> bool | None:
    """Return whether this host's clock is NTP-synchronized, or None if we cannot tell.

    Loop-safe: one read-only adjtimex(2) (modes = 0, STA_UNSYNC) and at most one stat on tmpfs.
    Where adjtimex is missing or refused (the unit's seccomp filter answers EPERM), the marker
    file systemd-timesyncd creates once synchronized is the fallback. Never raises.
    """
    try:
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):  # not Linux/glibc-like
        adjtimex = None
    if adjtimex is not None:
        tx = _Timex()
        if adjtimex(ctypes.byref(tx)) >= 0:
            return not tx.status & _STA_UNSYNC
    try:
        return True if os.path.exists(marker_path) else None
    except OSError:  # pragma: no cover - exists() already swallows most
        return None


def log_clock_sync_state(synchronized: Callable[[], bool | None] = clock_synchronized) -> bool | None:
    """Warn if this host's clock is not synchronized (call at mesh start); return the state."""
    state = synchronized()
    if state is False:
        log.warning(
            "mesh_clock_unsynchronized",
            detail="this host's clock is not NTP-synchronized; peers still accept us (replay protection "
            "does not use wall clocks) but they will log our skew and times we report are off",
        )
    elif state is None:
        log.debug("mesh_clock_sync_unknown")
    return state


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
    """Seal and open packets/frames with the cluster keyring and label.

    `clock` is the wall clock (stamped for old receivers, compared with ours only to log skew and
    for unstamped nonces); `sender_clock` drives our stamp positions and must never step back.
    """

    def __init__(
        self,
        *,
        keyring: Keyring,
        cluster_label: str,
        replay: ReplayWindow | None = None,
        clock: Callable[[], float] = time.time,
        senders: SenderWindow | None = None,
        sender_clock: Callable[[], float] = boot_clock,
        skew_log: ClockSkewLog | None = None,
    ) -> None:
        label = cluster_label.encode("utf-8")
        if len(label) > const.MAX_CLUSTER_LABEL_BYTES:
            raise WireError("cluster label too long")
        self.keyring = keyring
        self._aad = bytes([const.PROTOCOL_VERSION]) + label
        self._replay = replay if replay is not None else ReplayWindow(clock=clock)
        self._senders = senders if senders is not None else SenderWindow()
        self._skew_log = skew_log if skew_log is not None else ClockSkewLog()
        self._clock = clock
        self._sender_clock = sender_clock
        self._new_session()

    def _new_session(self) -> None:
        self._session = secrets.token_bytes(const.NONCE_SESSION_BYTES)
        self._epoch = self._sender_clock()
        self._position = 0

    def _next_stamp(self) -> bytes:
        # Strictly increasing even if the clock does not move between two calls, so a
        # (session, position) pair, and therefore the XChaCha20 nonce, is never reused.
        position = max(self._position + 1, int((self._sender_clock() - self._epoch) * 1_000_000))
        if position > _MAX_POSITION:  # 8.9 years in one process: start a new timeline
            self._new_session()
            position = 1
        self._position = position
        return self._session + const.NONCE_STAMP_MARKER + position.to_bytes(const.NONCE_POSITION_BYTES, "big")

    def seal(self, plaintext: bytes, *, max_bytes: int = const.MAX_UDP_PACKET_BYTES) -> bytes:
        """Encrypt with the primary key; raise WireError if the result exceeds `max_bytes`."""
        if len(plaintext) + const.ENVELOPE_OVERHEAD_BYTES > max_bytes:
            raise WireError("plaintext too large for the envelope cap")
        nonce = _TS.pack(max(0, int(self._clock() * 1000))) + self._next_stamp()
        ct = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, self._aad, nonce, self.keyring.primary_key)
        return bytes([const.PROTOCOL_VERSION]) + self.keyring.primary_key_id + nonce + ct

    def open(self, packet: bytes, *, max_bytes: int = const.MAX_UDP_PACKET_BYTES, peer: str | None = None) -> bytes:
        """Authenticate and decrypt; raise DropError(reason) on anything wrong.

        `peer` (the source address, for logs only) names the sender in clock-skew warnings.
        """
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
        # Only authenticated nonces reach the windows (no cache pollution by forgeries).
        if nonce[_MARKER_AT:_POSITION_AT] != const.NONCE_STAMP_MARKER:
            verdict = self._replay.check(nonce)  # an older sender: wall clocks must agree
            if verdict is not None:
                raise DropError(verdict)
            return bytes(plaintext)
        session = nonce[_SESSION_AT:_MARKER_AT]
        verdict = self._senders.check(session, int.from_bytes(nonce[_POSITION_AT:], "big"))
        if verdict is not None:
            raise DropError(verdict)
        if peer is not None:  # frames come without an address; the same sender also speaks UDP
            skew_s = _TS.unpack_from(nonce)[0] / 1000.0 - self._clock()
            self._skew_log.observe(session.hex(), skew_s, peer=peer, session=session.hex())
        return bytes(plaintext)
