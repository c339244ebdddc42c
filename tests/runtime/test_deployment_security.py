"""A deployment only its own parties can use: the SuperLink answers its Control and Runtime APIs only to its own
host (Flower 1.42 serves them on the SuperNodes' port), and private keys are never readable by others.

The loopback test plays a party that reaches only the SuperLink's public address (this machine's non-loopback
address, so the SuperLink sees a non-local peer): with TLS and SuperNode authentication as `cellm flower commands`
prints them, it can neither register a node key nor start a run, while the same commands work on the SuperLink's
host and a registered SuperNode still connects through the public address.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import sys
from pathlib import Path

import pytest

from cellm.errors import ConfigError
from cellm.runtime.flower import superlink as S

# ------------------------------------------------------------------ the guard in front of Flower's HTTP app


class _App:
    """An ASGI app that records the requests that reach it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(scope.get("path", scope["type"]))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def _request(guard: S.LocalOnlyGuard, path: str, peer: str | None, kind: str = "http") -> int | None:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "path": path, "client": None if peer is None else (peer, 40000)}
    asyncio.run(guard(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    return starts[0]["status"] if starts else (1008 if sent and sent[0]["type"] == "websocket.close" else None)


def test_the_guard_lets_the_fleet_api_through_from_anywhere_and_the_rest_only_from_this_host():
    app, refusals = _App(), []
    guard = S.LocalOnlyGuard(app, local={"10.1.2.3"}, on_refusal=lambda path, peer: refusals.append((path, peer)))
    remote = "203.0.113.7"
    assert _request(guard, "/v1/fleet/pull-messages", remote) == 200
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/get-nodes", "/docs",
                 "/openapi.json", "/health", "/v1/fleet/../control/start-run", "/v1/fleet//x", "/v1/fleet/",
                 "/v1/fleetx/y", "/V1/fleet/pull-messages"):
        assert _request(guard, path, remote) == 403, path
    assert _request(guard, "/v1/control/start-run", "::ffff:203.0.113.7") == 403
    assert _request(guard, "/v1/control/start-run", None) == 403  # no peer address: not this host
    assert _request(guard, "/v1/control/start-run", remote, kind="websocket") == 1008
    assert app.seen == ["/v1/fleet/pull-messages"]  # nothing refused reached Flower
    assert refusals[0] == ("/v1/control/start-run", remote) and len(refusals) == 14
    for peer in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "10.1.2.3"):
        assert _request(guard, "/v1/control/start-run", peer) == 200, peer
    assert _request(guard, "lifespan", None, kind="lifespan") is None and app.seen[-1] == "lifespan"


def test_this_host_is_loopback_plus_the_one_address_the_superlink_is_bound_to():
    assert S.local_addresses("0.0.0.0") == frozenset() and S.local_addresses("::") == frozenset()
    assert S.local_addresses("192.0.2.10") == frozenset({"192.0.2.10"})
    assert S.local_addresses("localhost") <= {"127.0.0.1", "::1"}
    assert not S.is_local("192.0.2.11", S.local_addresses("192.0.2.10"))
    assert not S.is_local("not-an-address") and not S.is_local("")


def test_the_printed_deployment_starts_the_guarded_superlink_and_uses_flwr_on_its_host(tmp_path):
    from cellm.interface.flower_cli import commands_text

    text = commands_text("10.0.0.5:9093", 2, str(tmp_path / "certs"), str(tmp_path / "keys"))
    superlink = next(line for line in text.splitlines() if "cellm.runtime.flower.superlink" in line)
    assert "--host 0.0.0.0 --port 9093" in superlink and "--enable-supernode-auth" in superlink
    assert "flower-superlink" not in superlink.split("#")[0].split()[0]
    assert 'address = "127.0.0.1:9093"' in text and "ssh -N -L 9093:127.0.0.1:9093" in text
    assert "--superlink 10.0.0.5:9093" in text and "--insecure" not in text
    loopback = commands_text("127.0.0.1:9093", 1, None, None)
    assert "--host 127.0.0.1 --port 9093" in loopback


# ------------------------------------------------------------------ private keys


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_created_0600_even_with_a_permissive_umask(tmp_path, monkeypatch):
    """Created with mode 0600, not chmod'ed afterwards: with chmod disabled and umask 0 the keys are still 0600."""
    pytest.importorskip("cryptography", reason="comes with cellm[flower]")
    from cellm.runtime.flower import deploy as D

    monkeypatch.setattr(Path, "chmod", lambda self, mode, **kw: None)
    monkeypatch.setattr(os, "chmod", lambda *a, **kw: None)
    old = os.umask(0)
    try:
        priv, pub = D.make_node_keys(tmp_path / "keys", "node0")
        tls = D.make_certificates(tmp_path / "certs")
    finally:
        os.umask(old)
    assert _mode(priv) == 0o600 and _mode(tls.server_key) == 0o600
    assert _mode(pub) & 0o044 and _mode(tls.ca_cert) & 0o044  # public files stay readable
    assert priv.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert tls.server_key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_an_existing_key_is_never_overwritten(tmp_path):
    pytest.importorskip("cryptography", reason="comes with cellm[flower]")
    from cellm.runtime.flower import deploy as D

    priv, _ = D.make_node_keys(tmp_path, "node0")
    before = priv.read_bytes()
    with pytest.raises(ConfigError, match="already exist"):
        D.make_node_keys(tmp_path, "node0")
    assert priv.read_bytes() == before
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "server.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="server.key"):
        D.make_certificates(tmp_path / "certs")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "certs" / "ca.crt").exists()
    with pytest.raises(FileExistsError):  # the low-level writer itself refuses, race or not
        D.write_private(priv, b"x")


# ------------------------------------------------------------------ loopback deployment: an outsider on the public port


REFUSED = "answers its Control and Runtime APIs only on its own host"  # from the SuperLink's HTTP 403


def _said(proc) -> str:
    """What a flwr command printed, with its box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stdout + proc.stderr).split())


def _public_address() -> str | None:
    """A non-loopback IPv4 address of this machine: peers connecting to it are not loopback peers."""
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127."):
                    return a.address
    except ImportError:
        pass
    return None


def test_a_party_on_the_public_port_can_neither_register_a_node_key_nor_start_a_run(tmp_path):
    pytest.importorskip("flwr", reason="Flower is not installed: pip install 'cellm[flower]' (make test does)")
    from test_flower import Processes, flwr_cli, free_port, wait_port, write_connection

    from cellm.runtime.flower import APP_DIR
    from cellm.runtime.flower import deploy as D

    public = _public_address()
    if public is None:
        pytest.skip("this machine has no non-loopback IPv4 address to play a remote party from")
    home = tmp_path / "flwr-home"
    env = {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # As `cellm flower certs --host PUBLIC` makes them: valid for the public address and for loopback, so that
    # what fails below is the SuperLink's refusal, not TLS.
    tls = D.make_certificates(tmp_path / "certs", (public, "127.0.0.1", "localhost"))
    node_priv, node_pub = D.make_node_keys(tmp_path / "keys", "node0")
    _, intruder_pub = D.make_node_keys(tmp_path / "keys", "intruder")
    port = free_port()
    write_connection(home, "inside", f"127.0.0.1:{port}", tls.ca_cert)
    write_connection(home, "outside", f"{public}:{port}", tls.ca_cert)
    procs = Processes(tmp_path)
    try:
        link = procs.start("superlink", D.superlink_command(f"0.0.0.0:{port}", tls=tls, auth=True,
                                                             database=tmp_path / "superlink.db"))
        wait_port(port, link, timeout=60)

        # The outsider: refused by the SuperLink (HTTP 403 with cellm's reason), for a key and for a run.
        reg = flwr_cli(["supernode", "register", str(intruder_pub), "outside"], timeout=60, cwd=tmp_path)
        assert reg.returncode != 0 and REFUSED in _said(reg), reg.stdout + reg.stderr
        run_config = D.run_config_file(tmp_path / "rc.toml", "rounds = 1\n", None)
        run = flwr_cli(["run", str(APP_DIR), "outside", "--run-config", str(run_config)], timeout=120, cwd=tmp_path)
        assert run.returncode != 0 and REFUSED in _said(run), run.stdout + run.stderr
        ls_out = flwr_cli(["ls", "outside", "--format", "json"], timeout=60, cwd=tmp_path)
        assert json.loads(ls_out.stdout)["success"] is False and REFUSED in _said(ls_out), ls_out.stdout

        # On the SuperLink's host: nothing was registered nor started; the same commands work.
        nodes = flwr_cli(["supernode", "ls", "inside", "--format", "json"], timeout=60, cwd=tmp_path)
        assert nodes.returncode == 0 and json.loads(nodes.stdout)["nodes"] == [], nodes.stdout + nodes.stderr
        runs = flwr_cli(["ls", "inside", "--format", "json"], timeout=60, cwd=tmp_path)
        assert runs.returncode == 0 and json.loads(runs.stdout)["runs"] == [], runs.stdout + runs.stderr
        reg = flwr_cli(["supernode", "register", str(node_pub), "inside"], timeout=60, cwd=tmp_path)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        listed = json.loads(flwr_cli(["supernode", "ls", "inside", "--format", "json"], timeout=60, cwd=tmp_path).stdout)
        assert [n["status"] for n in listed["nodes"]] == ["registered"]  # not online until the node connects
        log = procs.log("superlink")
        assert "cellm: refused /v1/control/" in log and f"from {public}" in log

        # The public port still serves the Fleet API: the registered SuperNode connects through it and is online.
        procs.start("supernode", D.supernode_command(f"{public}:{port}", free_port(), "partition-id=0 num-partitions=1",
                                                     ca_cert=tls.ca_cert, private_key=node_priv))
        from test_flower import wait_for

        def online() -> bool:
            r = flwr_cli(["supernode", "ls", "inside", "--format", "json"], timeout=60, cwd=tmp_path)
            listed = json.loads(r.stdout)["nodes"] if r.returncode == 0 else []
            return len(listed) == 1 and listed[0]["status"] == "online"

        wait_for("the registered SuperNode online through the public address", online, 90)
    except BaseException:
        for name, *_ in procs.procs:
            print(f"----- {name}.log (tail)\n{procs.log(name)[-4000:]}", file=sys.stderr)
        raise
    finally:
        procs.stop()
        shutil.rmtree(tmp_path / "keys", ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
