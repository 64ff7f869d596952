"""Signed node-to-node HTTP requests: signing, verification, and forwarding with failover.

A forwarded request carries

    X-Mongars-Node   sender node id          X-Mongars-Ts     sender wall clock, ms
    X-Mongars-Nonce  32 hex chars (a stamp)  X-Mongars-Hops   hops so far (>= 1)
    X-Mongars-User   the origin user         X-Mongars-Sig    base64 Ed25519 signature

The signature covers a domain tag, the target node id (so a request signed for one node cannot
be replayed to another), method, path with query, timestamp, nonce, SHA-256 of the body, hops
and origin user. The receiver looks the sender's public key up in live membership, checks the
signature, refuses replays, then treats the request as the origin user with role `peer`. User
bearer tokens never travel to peers.

Replays (issue 9): the nonce is a stamp, "6d67" (the marker) | boot session (5 bytes) |
position (6 bytes, us on the sender's CLOCK_BOOTTIME) | random (3 bytes), signed like the rest.
The receiver keeps a high-water mark per (node, boot session) (`security.SenderWindow`), so the
wall clocks of sender and receiver need not agree; the timestamp is then only compared with ours
to log skew. The boot session lasts as long as the sender's boot, across daemon restarts. A
nonce without the marker (an older sender) keeps the old rule: timestamp within
MAX_CLOCK_SKEW_S of our clock, nonce not seen inside that window.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from mongarsd.errors import AuthError
from mongarsd.mesh import const
from mongarsd.mesh.identity import NodeIdentity, node_id_from_public_key
from mongarsd.mesh.security import ClockSkewLog, SenderWindow, boot_clock

H_NODE: Final = "X-Mongars-Node"
H_TS: Final = "X-Mongars-Ts"
H_NONCE: Final = "X-Mongars-Nonce"
H_HOPS: Final = "X-Mongars-Hops"
H_USER: Final = "X-Mongars-User"
H_SIG: Final = "X-Mongars-Sig"
H_SERVED_BY: Final = "X-Mongars-Served-By"
SIGNED_HEADERS: Final = (H_NODE, H_TS, H_NONCE, H_HOPS, H_USER, H_SIG)

SIGNATURE_DOMAIN: Final = b"mongarsd-forward-v1"
MAX_CLOCK_SKEW_S: Final = 30.0  # unstamped nonces only; above it, stamped requests log the skew
REPLAY_WINDOW_S: Final = 30.0  # a request this far behind its sender's newest (sender's clock) is stale
REPLAY_CACHE_MAX: Final = 65536
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"
STAMP_MARKER: Final = const.NONCE_STAMP_MARKER.hex()
_STAMP_SESSION_BYTES: Final = 5
_STAMP_POSITION_BYTES: Final = 6
_STAMP_UNIQ_BYTES: Final = 3
MAX_HOPS_HEADER: Final = 16
MAX_USER_LEN: Final = 128

_NODE_RE: Final = re.compile(r"[0-9a-f]{16}")
_NONCE_RE: Final = re.compile(r"[0-9a-f]{32}")
_TS_RE: Final = re.compile(r"[0-9]{1,15}")
_USER_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


def signing_payload(*, target: str, method: str, path_qs: str, ts_ms: int, nonce: str, body: bytes, hops: int, user: str) -> bytes:
    """Return the exact bytes a forwarded request's signature covers (pure)."""
    parts = [
        SIGNATURE_DOMAIN,
        target.encode(),
        method.upper().encode(),
        path_qs.encode(),
        str(ts_ms).encode(),
        nonce.encode(),
        hashlib.sha256(body).hexdigest().encode(),
        str(hops).encode(),
        user.encode(),
    ]
    return b"\n".join(parts)


@functools.cache
def boot_id() -> bytes:
    """Return this boot's id (constant for the process; random where the kernel has none).

    The first call reads procfs: the mesh makes it off the loop when it starts (blocking).
    """
    try:
        return Path(BOOT_ID_PATH).read_text(encoding="ascii").strip().encode()  # procfs: no I/O wait
    except (OSError, UnicodeDecodeError):
        return secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class Stamp:
    """The parts of a stamped nonce: sender timeline, position on it (us), tie-breaker."""

    session: bytes
    position_us: int
    uniq: int


def make_nonce(*, session: bytes | None = None, position_us: int | None = None) -> str:
    """Return a stamped nonce: our boot session and CLOCK_BOOTTIME position, plus 24 random bits."""
    position = int(boot_clock() * 1_000_000) if position_us is None else position_us
    epoch, position = divmod(position, 2 ** (8 * _STAMP_POSITION_BYTES))  # wraps after 8.9 years up
    if session is None:
        session = hashlib.sha256(boot_id() + epoch.to_bytes(4, "big")).digest()[:_STAMP_SESSION_BYTES]
    raw: bytes = (
        const.NONCE_STAMP_MARKER + session + position.to_bytes(_STAMP_POSITION_BYTES, "big") + secrets.token_bytes(_STAMP_UNIQ_BYTES)
    )
    return raw.hex()


def parse_stamp(nonce: str) -> Stamp | None:
    """Return the stamp of a well-formed 32-hex nonce, or None for an unstamped (older) one (pure)."""
    if not nonce.startswith(STAMP_MARKER):
        return None
    raw = bytes.fromhex(nonce)[len(const.NONCE_STAMP_MARKER) :]
    pos_at = _STAMP_SESSION_BYTES
    uniq_at = pos_at + _STAMP_POSITION_BYTES
    return Stamp(
        session=raw[:pos_at],
        position_us=int.from_bytes(raw[pos_at:uniq_at], "big"),
        uniq=int.from_bytes(raw[uniq_at:], "big"),
    )


def sign_headers(
    identity: NodeIdentity,
    *,
    target: str,
    method: str,
    path_qs: str,
    body: bytes,
    hops: int,
    user: str,
    now_s: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the headers that authenticate one request from this node to `target`."""
    ts_ms = max(0, int((time.time() if now_s is None else now_s) * 1000))
    nonce = make_nonce() if nonce is None else nonce
    payload = signing_payload(target=target, method=method, path_qs=path_qs, ts_ms=ts_ms, nonce=nonce, body=body, hops=hops, user=user)
    return {
        H_NODE: identity.node_id,
        H_TS: str(ts_ms),
        H_NONCE: nonce,
        H_HOPS: str(hops),
        H_USER: user,
        H_SIG: base64.b64encode(identity.sign(payload)).decode("ascii"),
    }


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """A request proven to come from `node_id`, on behalf of `user`, after `hops` hops."""

    node_id: str
    user: str
    hops: int


class ReplayCache:
    """Unstamped nonces seen within the skew window, bounded (oldest evicted first)."""

    def __init__(self, max_entries: int = REPLAY_CACHE_MAX) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def seen(self, key: str, now: float, ttl_s: float) -> bool:
        """Return True if `key` was seen and not expired; else remember it."""
        while self._seen:
            oldest, expiry = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[oldest]
        if key in self._seen:
            return True
        self._seen[key] = now + ttl_s
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


class RequestVerifier:
    """Check signed peer requests against live membership keys (loop-only)."""

    def __init__(
        self,
        *,
        local_node_id: str,
        public_key_of: Callable[[str], bytes | None],
        clock: Callable[[], float] = time.time,
        max_skew_s: float = MAX_CLOCK_SKEW_S,
        replay: ReplayCache | None = None,
        senders: SenderWindow | None = None,
        skew_log: ClockSkewLog | None = None,
    ) -> None:
        self._local = local_node_id
        self._key_of = public_key_of
        self._clock = clock
        self._skew = max_skew_s
        self._replay = replay if replay is not None else ReplayCache()
        self._senders = senders if senders is not None else SenderWindow(window_s=REPLAY_WINDOW_S, max_entries=REPLAY_CACHE_MAX)
        self._skew_log = skew_log if skew_log is not None else ClockSkewLog(bound_s=max_skew_s)
        self.rejected: dict[str, int] = {}

    def _reject(self, reason: str, message: str) -> AuthError:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return AuthError(f"peer request refused: {message}")

    def verify(self, *, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> VerifiedPeer:
        """Return who sent this request or raise AuthError (401) saying why."""
        node = headers.get(H_NODE, "")
        ts = headers.get(H_TS, "")
        nonce = headers.get(H_NONCE, "")
        hops_s = headers.get(H_HOPS, "")
        user = headers.get(H_USER, "")
        sig_b64 = headers.get(H_SIG, "")
        if not (
            _NODE_RE.fullmatch(node)
            and _TS_RE.fullmatch(ts)
            and _NONCE_RE.fullmatch(nonce)
            and hops_s.isdigit()
            and _USER_RE.fullmatch(user)
        ):
            raise self._reject("malformed", "malformed X-Mongars-* headers")
        hops = int(hops_s)
        if not 1 <= hops <= MAX_HOPS_HEADER:
            raise self._reject("malformed", "hop count out of range")
        try:
            sig = base64.b64decode(sig_b64, validate=True)
        except (binascii.Error, ValueError):
            raise self._reject("malformed", "signature is not base64") from None
        if len(sig) != 64:
            raise self._reject("malformed", "signature has the wrong length")
        stamp = parse_stamp(nonce)
        now = self._clock()
        skew_s = int(ts) / 1000.0 - now
        if stamp is None and abs(skew_s) > self._skew:  # an older sender: only its clock vouches
            raise self._reject("stale", f"timestamp outside the {self._skew:g} s window (check the clocks)")
        key = self._key_of(node)
        if key is None or node_id_from_public_key(key) != node:
            raise self._reject("unknown_node", f"node {node} is not a live member of this mesh")
        payload = signing_payload(
            target=self._local, method=method, path_qs=path_qs, ts_ms=int(ts), nonce=nonce, body=body, hops=hops, user=user
        )
        try:
            VerifyKey(key).verify(payload, sig)
        except BadSignatureError:
            raise self._reject("bad_signature", "signature does not verify") from None
        # Only a verified request consumes its nonce, so forged copies cannot burn real ones.
        if stamp is None:
            if self._replay.seen(f"{node}:{nonce}", now, 2 * self._skew):
                raise self._reject("replay", "request replayed")
            return VerifiedPeer(node_id=node, user=user, hops=hops)
        # Keyed on the signed node id and session, never on the address it came from.
        verdict = self._senders.check((node, stamp.session), stamp.position_us, stamp.uniq)
        if verdict == "replay":
            raise self._reject("replay", "request replayed")
        if verdict is not None:
            raise self._reject("stale", f"request older than the {REPLAY_WINDOW_S:g} s replay window of its sender")
        self._skew_log.observe(node, skew_s, peer=node)
        return VerifiedPeer(node_id=node, user=user, hops=hops)
