"""``python -m cellm.runtime.flower.superlink [flower-superlink options]``: Flower's SuperLink whose Control and
Runtime APIs answer only this host.

Why: Flower 1.42 serves three APIs over one HTTP server on ``--host``/``--port``: the Fleet API (SuperNodes,
``/v1/fleet/...``), the Control API (``flwr run``, ``flwr supernode register``, ``flwr ls``: ``/v1/control/...``)
and the Runtime API (the ServerApp: ``/v1/runtime/...``). ``--control-api-address`` is deprecated there and moves
nothing (it only places a legacy gRPC copy that Flower starts under an internal switch). Without Flower's
enterprise OIDC plugin the Control API has no authentication: anyone who reaches the SuperNodes' port could
register a node key of their own (which defeats SuperNode authentication) and ``flwr run`` any app, that is, run
their code on the SuperLink's host and on every SuperNode.

This launcher runs the installed ``flower-superlink`` unchanged, with one ASGI layer around its HTTP app
(:class:`LocalOnlyGuard`): a request for ``/v1/fleet/...`` passes from anywhere (SuperNode authentication and TLS
still apply); every other request (Control, Runtime, docs) passes only from this host, i.e. a loopback peer
address, or the address the SuperLink is bound to when ``--host`` names one (Flower's own SuperExec reaches the
Runtime API through it). Others get HTTP 403, and the refusal is logged. Run ``flwr`` on the SuperLink's host, or
through an SSH tunnel to it (``ssh -N -L PORT:127.0.0.1:PORT user@superlink-host``).

Do not put a reverse proxy on this host in front of it: every request would then come from this host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
CHECKED_FLOWER = "1.42."  # the Flower release whose HTTP layout this guard was written for
REFUSAL = ("cellm's SuperLink answers its Control and Runtime APIs only on its own host: run flwr there, or "
           "through an SSH tunnel to it (ssh -N -L PORT:127.0.0.1:PORT user@superlink-host)")
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def local_addresses(bind_host: str) -> frozenset[str]:
    """The addresses besides loopback that count as this host: those of ``bind_host`` when it names one address
    (a wildcard bind adds none: local clients, SuperExec included, then come over loopback)."""
    if bind_host in _WILDCARDS:
        return frozenset()
    ip = _ip(bind_host)
    if ip is not None:
        return frozenset({str(ip)})
    try:
        infos = socket.getaddrinfo(bind_host, None)
    except OSError:
        return frozenset()
    return frozenset(str(_ip(str(info[4][0]))) for info in infos if _ip(str(info[4][0])) is not None)


def is_local(peer: str | None, local: Iterable[str] = ()) -> bool:
    """Whether a peer address is this host: loopback (IPv4, IPv6 or IPv4-mapped), or one of ``local``."""
    if not peer:
        return False
    ip = _ip(peer)
    if ip is None:
        return False
    return ip.is_loopback or str(ip) in set(local)


def fleet_path(path: str) -> bool:
    """A Fleet API request path, without dot segments or empty segments that could route elsewhere."""
    if not path.startswith(FLEET_PREFIX):
        return False
    parts = path[len(FLEET_PREFIX):].split("/")
    return all(p not in ("", ".", "..") for p in parts)


def allowed(path: str, peer: str | None, local: Iterable[str] = ()) -> bool:
    """The guard's rule: the Fleet API from anywhere, everything else from this host only."""
    return fleet_path(path) or is_local(peer, local)


class LocalOnlyGuard:
    """ASGI middleware applying :func:`allowed` to every HTTP and WebSocket request; others (lifespan) pass."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], local: Iterable[str] = (),
                 on_refusal: Callable[[str, str], None] | None = None) -> None:
        self.app, self.local, self.on_refusal = app, frozenset(local), on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        client = scope.get("client")
        peer = str(client[0]) if client else None
        if allowed(path, peer, self.local):
            await self.app(scope, receive, send)
            return
        if self.on_refusal is not None:
            self.on_refusal(path[:200], peer or "an unknown peer")
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": REFUSAL}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _option(args: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` or ``--name=VALUE`` in ``args`` (as argparse would take it)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def main(argv: list[str] | None = None) -> None:
    """Start ``flower-superlink`` with ``argv`` (default: this process's arguments) behind :class:`LocalOnlyGuard`."""
    from logging import WARNING

    import uvicorn
    from flwr.common.logger import log
    from flwr.supercore.version import package_version

    args = list(sys.argv[1:] if argv is None else argv)
    if not package_version.startswith(CHECKED_FLOWER) and "-h" not in args and "--help" not in args:
        raise SystemExit(f"cellm's SuperLink launcher was checked with Flower {CHECKED_FLOWER}x, not "
                         f"{package_version}: its API layout may differ; install flwr=={CHECKED_FLOWER}0")
    local = local_addresses(_option(args, "--host") or "127.0.0.1")
    # uvicorn believes X-Forwarded-For only from the peers listed here: loopback, never a remote party.
    os.environ["FORWARDED_ALLOW_IPS"] = "127.0.0.1"

    def refused(path: str, peer: str) -> None:
        log(WARNING, "cellm: refused %s from %s (only the Fleet API answers other hosts)", path, peer)

    real_run = uvicorn.run

    def guarded_run(app: Any, *a: Any, **kw: Any) -> None:
        real_run(LocalOnlyGuard(app, local, refused), *a, **kw)

    uvicorn.run = guarded_run  # flower-superlink serves its HTTP app (all three APIs) with uvicorn.run
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *args]
    flower_superlink()


if __name__ == "__main__":
    main()
