"""``cellm flower ...``: the same config as ``cellm run``, on Flower (needs ``pip install 'cellm[flower]'``).

    cellm flower sim --preset tiny --set rounds=2 --out runs/tiny-flower    # Flower's simulation runtime (Ray)
    cellm flower run --superlink NAME --preset tiny --out /abs/run/folder     # a SuperLink with SuperNodes
    cellm flower run --superlink NAME --resume /abs/run/folder                # continue it from its checkpoint
    cellm flower commands --tls-dir certs --keys-dir keys                    # print the deployment commands
    cellm flower certs certs/ ; cellm flower node-key keys/ node0           # TLS files, SuperNode keys
    cellm flower app-dir                                                     # the Flower app folder for flwr run

Wiring in :mod:`cellm.interface.cli`: ``flower_cli.add_parser(sub)`` in the parser, and
``if args.command == "flower": return flower_cli.main(args)`` in ``main``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cellm.config import load_config
from cellm.errors import ConfigError
from cellm.interface.cliargs import add_config_args, print_summary
from cellm.runtime.record import check_new_folder, default_out_dir

EXTRA_HINT = "cellm flower needs Flower: pip install 'cellm[flower]'"


def add_parser(subparsers) -> argparse.ArgumentParser:
    f = subparsers.add_parser("flower", help="Run on Flower: simulation, or a SuperLink with SuperNodes.",
                              description="Run the same cellm config on Flower (pip install 'cellm[flower]').")
    fsub = f.add_subparsers(dest="flower_command", required=True)

    s = fsub.add_parser("sim", help="Flower's simulation runtime (Ray), in this process.")
    add_config_args(s)
    s.add_argument("--out", help="Run folder (default runs/<model>-<data>-<time>).")
    s.add_argument("--supernodes", type=int, help="Virtual SuperNodes (default: one per cellm client).")
    s.add_argument("--workers", type=int, help="Parallel Ray workers (default: min(clients per round, CPUs)).")
    s.add_argument("--threads", type=int, help="Torch threads of the server and each worker when the config's "
                                                "run.threads is 0 (default: as `cellm run` would resolve it here).")
    s.add_argument("--no-progress", action="store_true", help="No progress bar.")
    s.add_argument("--resume", metavar="DIR", help="Continue the run in DIR from its last checkpoint.")

    r = fsub.add_parser("run", help="Submit the run to a SuperLink (flwr run with the resolved config).")
    add_config_args(r)
    r.add_argument("--superlink", required=True,
                   help="Name of a [superlink.NAME] connection in $FLWR_HOME/config.toml (default ~/.flwr).")
    r.add_argument("--out", help="Run folder, on the SuperLink machine (default: runs/<model>-<data>-<time> "
                                 "made absolute here); '-' for none.")
    r.add_argument("--node-wait-s", type=int, default=300,
                   help="Seconds to wait until connected SuperNodes serve every cellm client.")
    r.add_argument("--round-timeout-s", type=int, default=3600, help="Seconds before a round drops missing replies.")
    r.add_argument("--resume", metavar="DIR",
                   help="Continue the run in DIR (a run folder on the SuperLink machine) from its last checkpoint, "
                        "with the config recorded there; on the same SuperNodes every mode resumes exactly.")
    r.add_argument("--no-stream", action="store_true", help="Submit and return; do not stream the run's log.")
    r.add_argument("--print", dest="print_only", action="store_true",
                   help="Write the run config file and print the flwr command instead of running it.")

    c = fsub.add_parser("commands", help="Print the commands of a deployment (SuperLink, SuperNodes, run).")
    c.add_argument("--address", default="127.0.0.1:9093",
                   help="host:port at which SuperNodes reach the SuperLink; a host other than 127.0.0.1 makes the "
                        "SuperLink listen on every interface (its Control API still answers only its own host).")
    c.add_argument("--nodes", type=int, default=2, help="SuperNodes (each serves clients c %% nodes == i).")
    c.add_argument("--tls-dir", help="Folder of ca.crt/server.pem/server.key (from `cellm flower certs`); "
                                     "omit for an insecure (plain HTTP) deployment.")
    c.add_argument("--keys-dir", help="Folder of node0, node1, ... keys (from `cellm flower node-key`): "
                                      "enables SuperNode authentication (needs --tls-dir).")
    c.add_argument("--superlink-name", default="cellm", help="Name of the connection in $FLWR_HOME/config.toml.")

    k = fsub.add_parser("certs", help="Make a CA and a SuperLink TLS certificate + key (PEM).")
    k.add_argument("dir")
    k.add_argument("--host", action="append", default=[],
                   help="IP or DNS name the SuperNodes use to reach the SuperLink (repeatable); 127.0.0.1 and "
                        "localhost are always added, for flwr on the SuperLink's host or through an SSH tunnel.")

    n = fsub.add_parser("node-key", help="Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH).")
    n.add_argument("dir")
    n.add_argument("name", help="File name of the private key; the public key is NAME.pub.")

    fsub.add_parser("app-dir", help="Print the Flower app folder (for `flwr run <folder> <superlink>`).")
    return f


def _need_flwr(module: str = "flwr") -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(EXTRA_HINT)


def _load(args: argparse.Namespace):

    return load_config(args.config, preset=args.preset, overrides=args.overrides)


def _check_resume_args(args: argparse.Namespace) -> None:
    if args.config or args.preset or args.overrides or args.out:
        raise ConfigError("--resume DIR takes the config from DIR; drop --config/--preset/--set/--out")


def _sim(args: argparse.Namespace) -> int:
    from cellm.runtime.flower.sim import run_flower_simulation

    if args.resume:
        _check_resume_args(args)
        cfg, out = None, Path(args.resume)
    else:
        cfg = _load(args)
        out = Path(args.out) if args.out else default_out_dir(cfg)
        check_new_folder(out)
    result = run_flower_simulation(cfg, out, num_supernodes=args.supernodes, workers=args.workers,
                                   torch_threads=args.threads, progress=not args.no_progress,
                                   resume=bool(args.resume))
    print_summary(result, " (Flower)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from cellm.runtime.flower import deploy as D

    if args.resume:  # the folder is on the SuperLink machine: the ServerApp reads and checks it there
        _check_resume_args(args)
        cfg_toml, out = None, Path(args.resume).absolute()
    else:
        cfg = _load(args)
        cfg_toml, out = cfg.to_toml(), None if args.out == "-" else Path(args.out or default_out_dir(cfg)).absolute()
    rc_dir = Path(tempfile.mkdtemp(prefix="cellm-flower-"))
    rc_file = D.run_config_file(rc_dir / "run-config.toml", cfg_toml, out, node_wait_s=args.node_wait_s,
                                round_timeout_s=args.round_timeout_s)
    cmd = D.flwr_run_command(args.superlink, rc_file, stream=not args.no_stream)
    if args.print_only:
        print(D.shell(cmd))
        return 0
    try:
        env = D.child_env()
        print(f"run folder (on the SuperLink machine): {out}", flush=True)
        # `flwr run --stream` exits 0 even when the ServerApp fails: read the run's final status from the SuperLink.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            m = re.search(r"started run (\d+)", line)
            if m and run_id is None:
                run_id = m.group(1)
        rc = proc.wait()
        if rc != 0 or run_id is None:
            return rc or 1
        if args.no_stream:
            print(f"submitted run {run_id}; follow it with: flwr log {run_id} {args.superlink}")
            return 0
        info = D.run_info(args.superlink, run_id, env)
        status = info.get("status", "")
        details = info.get("status-details")
        print(f"run {run_id}: {status}" + (f" ({details})" if details not in (None, "", "N/A") else ""))
        return 0 if status == "finished:completed" else 1
    finally:
        shutil.rmtree(rc_dir, ignore_errors=True)


def commands_text(address: str, nodes: int, tls_dir: str | None, keys_dir: str | None,
                  name: str = "cellm") -> str:
    """The shell commands of a loopback or multi-machine deployment, in order.

    ``address`` is where SuperNodes reach the SuperLink. Flower 1.42 serves its Fleet, Control and Runtime APIs on
    that one port; the SuperLink starts through cellm's launcher, which answers the Control and Runtime APIs only
    to its own host, so ``flwr`` (key registration, runs) is used on the SuperLink's machine or through a tunnel.
    """
    from cellm.runtime.flower import deploy as D
    from cellm.runtime.flower.superlink import is_local

    if keys_dir and not tls_dir:
        raise ConfigError("SuperNode authentication (--keys-dir) needs TLS (--tls-dir)")
    tls = None
    if tls_dir:
        t = Path(tls_dir).absolute()
        tls = D.TlsFiles(t / "ca.crt", t / "server.pem", t / "server.key")
    host, port = address.rsplit(":", 1)
    local_only = is_local(host) or host == "localhost"
    bind = address if local_only else f"0.0.0.0:{port}"
    control = f"127.0.0.1:{port}"
    lines = ["# 1. SuperLink. One port serves SuperNodes (Fleet API), flwr (Control API) and the ServerApp (Runtime "
             "API);", "#    cellm's launcher runs flower-superlink and answers Control and Runtime requests only "
             "from this host (HTTP 403 otherwise):",
             D.shell(D.superlink_command(bind, tls=tls, auth=bool(keys_dir), database="superlink.db")) + " &",
             "", "# 2. flwr's connection, on the SuperLink machine, in $FLWR_HOME/config.toml (default "
             "~/.flwr/config.toml);", f"#    from elsewhere, through a tunnel: ssh -N -L {port}:127.0.0.1:{port} "
             "USER@SUPERLINK-HOST",
             f"#    [superlink.{name}]", f'#    address = "{control}"',
             f'#    root-certificates = "{tls.ca_cert}"' if tls else "#    insecure = true"]
    if keys_dir:
        lines += ["", "# 3. register each SuperNode's public key (only these nodes may connect):"]
        lines += [f"flwr supernode register {Path(keys_dir).absolute() / f'node{i}.pub'} {name}"
                  for i in range(nodes)]
    lines += ["", f"# {4 if keys_dir else 3}. SuperNodes (node i serves cellm clients c with c % {nodes} == i; "
                  "on other machines, --superlink is the SuperLink's address as seen from there).",
              "#    A node reads its files only from its own node config: add model-path=..., data-path=..., "
              "data-test-path=...", "#    when the run sets model.path / data.path / data.test_path, and "
              "cache-dir=... state-dir=... to choose its folders:"]
    for i in range(nodes):
        key = Path(keys_dir).absolute() / f"node{i}" if keys_dir else None
        lines.append(D.shell(D.supernode_command(address, 9094 + i, f"partition-id={i} num-partitions={nodes}",
                                                 ca_cert=tls.ca_cert if tls else None, private_key=key))
                     + " &")
    lines += ["", f"# {5 if keys_dir else 4}. the run, on the SuperLink machine (same config options as `cellm run`):",
              f"cellm flower run --superlink {name} --preset tiny --out $PWD/runs/flower-tiny"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cmd = args.flower_command
    if cmd == "app-dir":
        from cellm.runtime.flower import APP_DIR

        print(APP_DIR)
        return 0
    if cmd == "commands":
        print(commands_text(args.address, args.nodes, args.tls_dir, args.keys_dir, args.superlink_name))
        return 0
    if cmd in ("sim", "run"):
        _need_flwr()
    if cmd in ("certs", "node-key"):
        _need_flwr("cryptography")  # comes with the extra
    if cmd == "sim":
        return _sim(args)
    if cmd == "run":
        return _run(args)
    if cmd == "certs":
        from cellm.runtime.flower import deploy as D

        hosts = tuple(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))  # in order, without repeats
        files = D.make_certificates(args.dir, hosts)
        print(f"CA certificate: {files.ca_cert}\nserver certificate: {files.server_cert}\n"
              f"server key: {files.server_key}")
        return 0
    if cmd == "node-key":
        from cellm.runtime.flower import deploy as D

        priv, pub = D.make_node_keys(args.dir, args.name)
        print(f"private key: {priv}\npublic key: {pub}")
        return 0
    print(f"cellm flower: unknown command {cmd!r}", file=sys.stderr)
    return 2
