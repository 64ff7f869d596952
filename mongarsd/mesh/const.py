"""Mesh protocol constants: versions, size caps and timing, with units in their names.

Tests patch these (or pass a `Timing` preset) instead of sleeping.
"""

from __future__ import annotations

from typing import Final

# Wire format version; authenticated as associated data on every packet and frame.
PROTOCOL_VERSION: Final = 1

# Sizes (bytes). The UDP cap stays below a 1500-byte Ethernet MTU with IP/UDP headers.
MAX_UDP_PACKET_BYTES: Final = 1400
MAX_TCP_FRAME_BYTES: Final = 4 * 1024 * 1024
KEY_BYTES: Final = 32
KEY_ID_BYTES: Final = 4
NONCE_BYTES: Final = 24
AEAD_TAG_BYTES: Final = 16
# version byte + key id + nonce + tag
ENVELOPE_OVERHEAD_BYTES: Final = 1 + KEY_ID_BYTES + NONCE_BYTES + AEAD_TAG_BYTES
FRAME_LENGTH_PREFIX_BYTES: Final = 4

# Schema limits checked after msgpack decode (and passed to msgpack as hard caps).
MAX_STR_LEN: Final = 255
MAX_NODE_ID_LEN: Final = 64
MAX_COMPOUND_PARTS: Final = 64
MAX_PUSH_PULL_MEMBERS: Final = 4096
MAX_STATE_BYTES: Final = 900  # encoded user state carried by an ALIVE record
MAX_STATE_DEPTH: Final = 4
MAX_CLUSTER_LABEL_BYTES: Final = 64
MAX_INCARNATION: Final = 2**63 - 1
MAX_SEQ: Final = 2**32 - 1

# Replay protection. A nonce carries the sender's wall clock (ms, informative only since issue 9)
# and a stamp: a per-process sender session and a strictly increasing position on the sender's
# own monotonic clock (us). Receivers keep a high-water mark per sender session, so wall clocks
# need not agree; see security.SenderWindow for the invariant.
MAX_CLOCK_SKEW_S: Final = 300.0  # legacy (unstamped) nonces: wall-clock bound; above it we log skew
REPLAY_WINDOW_S: Final = 300.0  # a packet this far behind its sender's newest, on the sender's clock, is stale
REPLAY_CACHE_MAX_ENTRIES: Final = 65536
REPLAY_MAX_SENDERS: Final = 16384  # sender sessions remembered (LRU); ~100 bytes each
NONCE_STAMP_MARKER: Final = b"mg"  # tells a stamped nonce from an old random one (2**-16 false match)
NONCE_SESSION_BYTES: Final = 8
NONCE_POSITION_BYTES: Final = 6  # 2**48 us = 8.9 years; the session rotates before it wraps
CLOCK_SKEW_LOG_INTERVAL_S: Final = 600.0
TIMESYNC_MARKER_PATH: Final = "/run/systemd/timesync/synchronized"

# Hostile-network logging: one log line per (reason, peer) per interval, bounded keys.
BAD_PACKET_LOG_INTERVAL_S: Final = 60.0
BAD_PACKET_LOG_MAX_KEYS: Final = 256

# Bounded queues and concurrency.
EVENT_QUEUE_MAX: Final = 1024
MAX_CONCURRENT_STREAMS: Final = 16
MAX_PENDING_INDIRECT: Final = 64
BROADCAST_QUEUE_MAX: Final = 4096

# Lifeguard awareness (local health multiplier) upper bound.
AWARENESS_MAX_MULTIPLIER: Final = 8

# Default machine-id path; identities are regenerated when it changes.
MACHINE_ID_PATH: Final = "/etc/machine-id"
