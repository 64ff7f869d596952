"""Per-node Ed25519 identity: node id, fingerprint, signing and verification of node records.

The node id is derived from the public key, so a node cannot claim another's id. The identity
file also stores a hash of /etc/machine-id: when the machine id changes (a cloned SD card that
was re-provisioned, or a fresh image) a new identity is generated, so clones are not one node.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from pathlib import Path

import msgpack
import structlog
from nacl.encoding import RawEncoder
from nacl.exceptions import BadSignatureError
from nacl.hash import blake2b
from nacl.signing import SigningKey, VerifyKey

from mongarsd.errors import MeshError
from mongarsd.fsutil import atomic_write_private
from mongarsd.mesh import const
from mongarsd.mesh.wire import Addr, NodeId, NodeRecord

log = structlog.get_logger("mongarsd.mesh.identity")

NODE_ID_HEX_CHARS = 16


class IdentityError(MeshError):
    """The identity file is unreadable or invalid."""


def node_id_from_public_key(public_key: bytes) -> NodeId:
    """Return the node id for an Ed25519 public key (16 hex chars of its BLAKE2b digest)."""
    digest = blake2b(public_key, digest_size=32, encoder=RawEncoder)
    return NodeId(digest.hex()[:NODE_ID_HEX_CHARS])


def fingerprint(public_key: bytes) -> str:
    """Return the identity fingerprint published in mDNS TXT `fp` (32 hex chars)."""
    return blake2b(public_key, digest_size=16, encoder=RawEncoder).hex()


def _machine_id_hash(machine_id_path: Path) -> str | None:
    try:
        raw = machine_id_path.read_bytes().strip()
    except FileNotFoundError:
        return None
    if not raw:
        return None
    return blake2b(raw, digest_size=16, encoder=RawEncoder).hex()


class NodeIdentity:
    """An Ed25519 key pair and the node id derived from it."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: NodeId = node_id_from_public_key(self.public_key)
        self.fingerprint: str = fingerprint(self.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """Return a fresh random identity (not persisted)."""
        return cls(SigningKey.generate())

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte detached signature of `data`."""
        return bytes(self._signing_key.sign(data).signature)

    @classmethod
    def load_or_create(cls, path: Path, *, machine_id_path: Path = Path(const.MACHINE_ID_PATH)) -> NodeIdentity:
        """Load the identity, regenerating it when machine-id changed (blocking; thread)."""
        mid = _machine_id_hash(machine_id_path)
        if path.exists():
            try:
                doc = json.loads(path.read_bytes())
                seed = base64.b64decode(doc["seed"], validate=True)
                stored_mid = doc.get("machine_id_hash")
                if len(seed) != 32:
                    raise ValueError("bad seed length")
            except (ValueError, KeyError, TypeError, binascii.Error) as err:
                raise IdentityError(f"identity file {path} is invalid") from err
            if stored_mid == mid:
                return cls(SigningKey(seed))
            log.warning("mesh_identity_regenerated", reason="machine_id_changed", path=str(path))
        ident = cls.generate()
        doc = {
            "seed": base64.b64encode(bytes(ident._signing_key)).decode("ascii"),
            "machine_id_hash": mid,
            "node_id": ident.node_id,
        }
        atomic_write_private(path, json.dumps(doc).encode("utf-8") + b"\n")
        return ident


# --- signed statements ---------------------------------------------------------------------


def _alive_payload(label: str, *, node_id: str, incarnation: int, addr: Addr, public_key: bytes, state: bytes) -> bytes:
    data: bytes = msgpack.packb(
        [const.PROTOCOL_VERSION, label, "alive", node_id, incarnation, addr[0], addr[1], public_key, state],
        use_bin_type=True,
    )
    return data


def _leave_payload(label: str, node_id: str, incarnation: int) -> bytes:
    data: bytes = msgpack.packb([const.PROTOCOL_VERSION, label, "leave", node_id, incarnation], use_bin_type=True)
    return data


def sign_record(identity: NodeIdentity, *, label: str, incarnation: int, addr: Addr, state: bytes) -> NodeRecord:
    """Return this node's record at `incarnation`, signed (cluster label included)."""
    payload = _alive_payload(
        label, node_id=identity.node_id, incarnation=incarnation, addr=addr, public_key=identity.public_key, state=state
    )
    return NodeRecord(
        node_id=identity.node_id,
        incarnation=incarnation,
        addr=addr,
        public_key=identity.public_key,
        state=state,
        signature=identity.sign(payload),
    )


def sign_leave(identity: NodeIdentity, *, label: str, incarnation: int) -> bytes:
    """Return the signature of a graceful leave at `incarnation`."""
    return identity.sign(_leave_payload(label, identity.node_id, incarnation))


def _verify(public_key: bytes, payload: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public_key).verify(payload, signature)
    except (BadSignatureError, ValueError):  # ValueError: malformed key
        return False
    return True


class Verifier:
    """Verify node records and leaves: id bound to key, key pinned on first use, revocations."""

    def __init__(self, *, label: str, revoked: Iterable[str] = ()) -> None:
        self._label = label
        self._pinned: dict[NodeId, bytes] = {}
        self._revoked: set[str] = set(revoked)

    def revoke(self, node_id: str) -> None:
        """Refuse every future statement by this node id."""
        self._revoked.add(node_id)

    def is_revoked(self, node_id: str) -> bool:
        return node_id in self._revoked

    def forget(self, node_id: NodeId) -> None:
        """Drop the pinned key of a reaped node."""
        self._pinned.pop(node_id, None)

    def check_record(self, record: NodeRecord) -> str | None:
        """Return None if the record is authentic, else a drop reason."""
        if record.node_id in self._revoked:
            return "revoked"
        if node_id_from_public_key(record.public_key) != record.node_id:
            return "bad_identity"
        pinned = self._pinned.get(record.node_id)
        if pinned is not None and pinned != record.public_key:
            return "bad_identity"
        payload = _alive_payload(
            self._label,
            node_id=record.node_id,
            incarnation=record.incarnation,
            addr=record.addr,
            public_key=record.public_key,
            state=record.state,
        )
        if not _verify(record.public_key, payload, record.signature):
            return "bad_signature"
        self._pinned[record.node_id] = record.public_key
        return None

    def check_leave(self, node_id: NodeId, incarnation: int, signature: bytes) -> str | None:
        """Return None if the leave is signed by the node's pinned key, else a drop reason."""
        if node_id in self._revoked:
            return "revoked"
        pinned = self._pinned.get(node_id)
        if pinned is None:
            return "unknown_node"
        if not _verify(pinned, _leave_payload(self._label, node_id, incarnation), signature):
            return "bad_signature"
        return None
