"""Run one Discovery inside a namespace and print events as JSON lines (test helper).

    python -m tests.netns.discovery_runner --node-id n0 --ck deadbeef [--iface eth0]

Lines: {"event": "started", ...}, {"event": "found", "node_id", "addresses", "ck", "fp",
"gossip", "api", "board", "ver"}, {"event": "lost", "node_id"}, {"event": "stopped"}.
SIGTERM/SIGINT stop it cleanly (mDNS goodbye). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

import structlog

from mongarsd.mesh.discovery import Discovery, ServiceProps
from mongarsd.mesh.interfaces import async_select_host_interfaces
from mongarsd.mesh.wire import NodeId


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    selection = await async_select_host_interfaces([args.iface])
    props = ServiceProps(
        version="0.1.0",
        board="netns",
        api_port=args.api_port,
        gossip_port=args.gossip_port,
        fingerprint=args.fp,
        cluster_key_id=args.ck,
    )

    def found(node_id: NodeId, addrs: tuple[str, ...], p: ServiceProps) -> None:
        emit(
            event="found",
            node_id=node_id,
            addresses=list(addrs),
            ck=p.cluster_key_id,
            fp=p.fingerprint,
            gossip=p.gossip_port,
            api=p.api_port,
            board=p.board,
            ver=p.version,
        )

    def lost(node_id: NodeId) -> None:
        emit(event="lost", node_id=node_id)

    disc = Discovery(node_id=args.node_id, props=props, interfaces=selection.chosen, on_found=found, on_lost=lost)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await disc.async_start()
    emit(event="started", node_id=args.node_id, interfaces=list(selection.names))
    try:
        await asyncio.wait_for(stop.wait(), args.duration_s)
    except TimeoutError:
        pass
    finally:
        await disc.async_stop()
        emit(event="stopped", node_id=args.node_id)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--ck", default="deadbeef")
    parser.add_argument("--fp", default="0" * 32)
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--api-port", type=int, default=8642)
    parser.add_argument("--gossip-port", type=int, default=8643)
    parser.add_argument("--duration-s", type=float, default=60.0)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    sys.exit(asyncio.run(main(parser.parse_args())))
