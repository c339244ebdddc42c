"""Deployment helpers: TLS certificates, SuperNode keys, the SuperLink connection file and the exact commands.

Nothing here trains; it only prepares what ``flower-superlink``, ``flower-supernode`` and ``flwr`` (Flower 1.42)
expect:

- TLS: a CA certificate, and a server certificate + key signed by it whose SANs name the SuperLink's address
  (``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile``; SuperNodes and ``flwr`` verify with
  ``--root-certificates`` / ``root-certificates`` = the CA certificate).
- SuperNode authentication: one ECDSA P-384 key pair per SuperNode in OpenSSH format
  (``flower-supernode --auth-supernode-private-key``); the SuperLink runs with ``--enable-supernode-auth`` and only
  nodes whose public key was registered (``flwr supernode register KEY.pub <superlink>``) are let in.
- The SuperLink starts through :mod:`cellm.runtime.flower.superlink`: Flower 1.42 serves the Fleet, Control and
  Runtime APIs on one port, and that launcher answers the Control and Runtime APIs only to its own host, so that
  registering keys and submitting runs needs a shell on the SuperLink's machine (or an SSH tunnel to it).

Private keys are created with mode 0600 from the start (never readable by others, whatever the umask), and an
existing key file is never overwritten.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cellm.runtime.flower import APP_DIR


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(out: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> TlsFiles:
    """A self-signed CA and a server certificate for ``hosts`` (IPs or DNS names) signed by it, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    _refuse_existing(files.ca_cert, files.server_cert, files.server_key)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cellm Flower CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_private(files.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    files.ca_cert.write_bytes(ca.public_bytes(pem))
    files.server_cert.write_bytes(cert.public_bytes(pem))
    return files


def make_node_keys(out: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode authentication: (OpenSSH private key, ``.pub`` public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    priv, pub = out / name, out / f"{name}.pub"
    _refuse_existing(priv, pub)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``: the file is never readable by others, not even for a
    moment and whatever the umask; an existing file is an error (``FileExistsError``), never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only clear bits: make it exactly owner read/write
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def _refuse_existing(*paths: Path) -> None:
    from cellm.errors import ConfigError

    there = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if there:
        raise ConfigError(f"{', '.join(there)} already exist(s): remove them first or choose another folder "
                          "(a key is never overwritten: a registered node or a distributed CA would stop matching)")


def superlink_command(address: str, *, tls: TlsFiles | None = None, auth: bool = False,
                      database: str | Path | None = None) -> list[str]:
    """The SuperLink listening on ``host:port`` (``0.0.0.0:PORT`` for every interface), started through
    :mod:`cellm.runtime.flower.superlink`: one port serves the Fleet API to SuperNodes anywhere, and the Control and
    Runtime APIs to this host only. The other arguments are ``flower-superlink``'s own."""
    host, port = address.rsplit(":", 1)
    cmd = ["python", "-m", "cellm.runtime.flower.superlink", "--host", host, "--port", port,
           "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, runtime_port: int, node_config: str, *, ca_cert: str | Path | None = None,
                      private_key: str | Path | None = None, host: str = "127.0.0.1",
                      max_wait_s: float | None = None) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port); ``node_config`` says which clients it serves."""
    cmd = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(runtime_port),
           "--node-config", node_config]
    cmd += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def run_config_file(path: str | Path, cfg_toml: str | None, out: str | Path | None, *,
                    node_wait_s: float | None = None, round_timeout_s: float | None = None) -> Path:
    """The ``--run-config`` TOML that hands a resolved cellm config (and run folder) to the ServerApp; with no
    config, a resume of the run in ``out``."""
    import tomli_w

    if cfg_toml is None and out is None:
        raise ValueError("a resume needs the run folder")
    data: dict[str, object] = {"out": "-" if out is None else str(Path(out).absolute())}
    if cfg_toml is None:
        data["resume"] = "true"
    else:
        data["config-toml"] = cfg_toml
    if node_wait_s is not None:
        data["node-wait-s"] = int(node_wait_s)
    if round_timeout_s is not None:
        data["round-timeout-s"] = int(round_timeout_s)
    path = Path(path)
    path.write_text(tomli_w.dumps(data))
    return path


def flwr_run_command(superlink_name: str, run_config: str | Path, *, stream: bool = True) -> list[str]:
    cmd = [flwr_executable(), "run", str(APP_DIR), superlink_name, "--run-config", str(run_config)]
    return cmd + (["--stream"] if stream else [])


def run_info(superlink_name: str, run_id: str | int, env: dict[str, str] | None = None) -> dict:
    """Flower's record of a run (``flwr ls --run-id``): status ("finished:completed", ...), status-details,
    network-traffic (bytes Flower itself moved, envelopes and setup messages included)."""
    r = subprocess.run([flwr_executable(), "ls", superlink_name, "--run-id", str(run_id), "--format", "json"],
                       capture_output=True, text=True, timeout=60, env=env)
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    runs = data.get("runs") or []
    if r.returncode != 0 or not runs:
        raise RuntimeError(f"flwr ls failed for run {run_id}: {r.stdout[-500:]}{r.stderr[-500:]}")
    return runs[0]


def flwr_executable() -> str:
    """The ``flwr`` installed beside this Python (a venv need not be activated), else the one on PATH."""
    local = Path(sys.executable).parent / "flwr"
    return str(local) if local.exists() else "flwr"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this Python's bin folder first on PATH, because Flower starts
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name; no runtime dependency installs."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env


def shell(cmd: list[str]) -> str:
    return shlex.join(cmd)
