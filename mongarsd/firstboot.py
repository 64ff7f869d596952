"""`mongarsd init`: the first-start step a package or an image runs once, safe to run again.

It creates what the daemon cannot sensibly create on its own: the node's mesh identity (the same
file `MeshService` loads) and a first admin API token, whose secret goes to a 0600 file in the
state dir (`admin.token`) and never to stdout. A second run finds both and changes nothing.
Run it as the user the daemon runs as (the Debian package uses `setpriv` to become `mongarsd`),
so that every file it creates belongs to that user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from mongarsd.const import EXIT_OK, TOKEN_PREFIX
from mongarsd.errors import MongarsError

ADMIN_TOKEN_FILE: Final = "admin.token"
ADMIN_USER: Final = "admin"
ADMIN_ROLE: Final = "admin"
ADMIN_LABEL: Final = "mongarsd init"
STATE_DIR_MODE: Final = 0o750  # the unit's StateDirectoryMode
TOKEN_FILE_MAX_BYTES: Final = 4096  # a token is ~60 bytes; anything bigger is not ours

IdentityState = Literal["created", "exists", "regenerated"]
TokenState = Literal["created", "exists", "exists-elsewhere"]


class InitError(MongarsError):
    """The first-start step could not create a file or read the state it found."""


@dataclass(frozen=True)
class IdentityOutcome:
    path: Path
    node_id: str
    state: IdentityState


@dataclass(frozen=True)
class TokenOutcome:
    path: Path
    token_id: str
    state: TokenState
    replaced_stale: bool = False


# --- files ---------------------------------------------------------------------------------


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state dir (0750) when missing; refuse root in a dir of another user (blocking)."""
    try:
        state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as err:
        raise InitError(f"cannot create the state directory {state_dir}: {err.strerror or err}") from err
    if not state_dir.is_dir():
        raise InitError(f"state directory {state_dir} is not a directory")
    owner = state_dir.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        # Files root made here would be unreadable by the daemon's user (0600, umask 077).
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise InitError(
            f"{state_dir} belongs to {name}, and files made by root would be unreadable to it; "
            f"run as that user: runuser -u {name} -- mongarsd init --state-dir {state_dir}"
        )


def ensure_identity(state_dir: Path, *, machine_id_path: Path | None = None) -> IdentityOutcome:
    """Load the mesh identity the daemon uses, creating it when missing (blocking; thread)."""
    from mongarsd.mesh import const as mesh_const
    from mongarsd.mesh.identity import NodeIdentity
    from mongarsd.mesh.service import IDENTITY_FILE, mesh_dir

    path = mesh_dir(state_dir) / IDENTITY_FILE
    try:
        before = path.read_bytes() if path.exists() else None
        identity = NodeIdentity.load_or_create(path, machine_id_path=machine_id_path or Path(mesh_const.MACHINE_ID_PATH))
        after = path.read_bytes()
    except OSError as err:
        raise InitError(f"cannot create the node identity {path}: {err.strerror or err}") from err
    # load_or_create replaces the file when /etc/machine-id changed (a cloned image).
    state: IdentityState = "created" if before is None else "exists" if before == after else "regenerated"
    return IdentityOutcome(path=path, node_id=identity.node_id, state=state)


def read_token_file(path: Path) -> str | None:
    """Return the token stored in `path`, "" when it is empty, None when there is no file (blocking)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(TOKEN_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InitError(f"cannot read the token file {path}: {err.strerror or err}") from err
    if len(raw) > TOKEN_FILE_MAX_BYTES:
        return "\0"  # never a token: the caller refuses to replace it
    return raw.decode("utf-8", "replace").strip()


def reserve_private_file(path: Path) -> Path:
    """Create an empty 0600 temporary file next to `path` (O_CREAT|O_EXCL) and return it (blocking)."""
    try:
        # mkstemp opens with O_CREAT|O_EXCL and mode 0600, so the secret is never readable by others.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise InitError(f"cannot write the token file {path}: {err.strerror or err}") from err
    os.close(fd)
    return Path(tmp)


def publish_private_file(tmp: Path, path: Path, data: bytes, *, replace: bool) -> None:
    """Fill the reserved 0600 file and move it to `path` atomically (blocking).

    Without `replace` the file is linked into place, which fails rather than overwrite one that
    appeared meanwhile; with it, a stale file is replaced by rename.
    """
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except FileExistsError as err:
        raise InitError(f"{path} appeared while writing it (is another `mongarsd init` running?)") from err
    except OSError as err:
        raise InitError(f"cannot write the token file {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)


# --- the admin token -----------------------------------------------------------------------


async def async_ensure_admin_token(db: Any, token_file: Path) -> TokenOutcome:
    """Create an admin token and store its secret in `token_file`, unless a live admin token exists."""
    from mongarsd.memory.tokens import TokenStore

    store = TokenStore(db=db)
    current = await asyncio.to_thread(read_token_file, token_file)
    if current:
        info = await store.async_verify(current)
        if info is not None and info.role == ADMIN_ROLE:
            return TokenOutcome(path=token_file, token_id=info.id, state="exists")
    live = [i for i in await store.async_list() if i.role == ADMIN_ROLE and i.revoked_at is None]
    if live:
        # An admin made one with `mongarsd token create`: a second admin secret would only be a liability.
        return TokenOutcome(path=token_file, token_id=live[0].id, state="exists-elsewhere")
    stale = current is not None
    if current and not current.startswith(TOKEN_PREFIX):
        raise InitError(f"{token_file} exists and does not hold a mongarsd token; move it away or choose --token-file")

    tmp = await asyncio.to_thread(reserve_private_file, token_file)
    try:
        secret, info = await store.async_create(ADMIN_USER, ADMIN_ROLE, ADMIN_LABEL)
    except BaseException:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)
        raise
    try:
        await asyncio.to_thread(publish_private_file, tmp, token_file, f"{secret}\n".encode(), replace=stale)
    except BaseException:
        # Nobody can ever read this secret: leave no live admin token behind (the next run retries).
        await store.async_revoke(info.id)
        raise
    return TokenOutcome(path=token_file, token_id=info.id, state="created", replaced_stale=stale)


# --- the command ---------------------------------------------------------------------------


def summary(identity: IdentityOutcome, token: TokenOutcome) -> str:
    """Return the one line `mongarsd init` prints; it never holds a secret."""
    ident = {
        "created": f"created node identity {identity.node_id}",
        "exists": f"node identity {identity.node_id} exists",
        "regenerated": f"regenerated node identity {identity.node_id} (machine-id changed)",
    }[identity.state]
    tok = {
        "created": f"created admin token {token.token_id}, secret in {token.path} (mode 0600)",
        "exists": f"admin token {token.token_id} exists, secret in {token.path}",
        "exists-elsewhere": f"a live admin token ({token.token_id}) exists already, not creating another; {token.path} does not hold it",
    }[token.state]
    if token.replaced_stale:
        tok += ", replacing a stale one"
    changed = identity.state != "exists" or token.state == "created"
    return f"mongarsd init: {ident} ({identity.path}); {tok}{'' if changed else '; nothing changed'}"


def cmd_init(args: argparse.Namespace) -> int:
    from mongarsd.cli_common import load_from_args
    from mongarsd.daemon import DB_FILE
    from mongarsd.memory.db import Database

    loaded, _ = load_from_args(args)
    state_dir = Path(loaded.config.server.state_dir)
    token_file = Path(args.token_file) if args.token_file else state_dir / ADMIN_TOKEN_FILE
    ensure_state_dir(state_dir)
    identity = ensure_identity(state_dir)

    async def main() -> TokenOutcome:
        db = Database(path=state_dir / DB_FILE)
        await db.async_start()
        try:
            return await async_ensure_admin_token(db, token_file)
        finally:
            await db.async_stop()

    token = asyncio.run(main())
    print(summary(identity, token))
    return EXIT_OK


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    """Add the `init` subcommand to the top-level parser."""
    p = sub.add_parser("init", help="first start: create the node identity and an admin token file (idempotent)")
    p.add_argument("--token-file", type=Path, help="where to write the admin token's secret (default <state dir>/admin.token)")
    add_config_args(p)
    p.set_defaults(func=cmd_init)
