"""Arguments and output shared by the ``cellm`` subcommands (run, compare, search, config, flower)."""

from __future__ import annotations

import argparse

from cellm.runtime.record import summary


def add_config_args(p: argparse.ArgumentParser, what: str = "") -> None:
    """--config / --preset / --set, resolved by :func:`cellm.config.load_config` in that order."""
    p.add_argument("--config", help=f"TOML config file{what} (applied over the preset, if one is given).")
    p.add_argument("--preset", help=f"Named preset{what} (see `cellm presets`).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set comm.up_density=0.25 (repeatable).")


def print_summary(result, runtime: str = "") -> None:
    """The lines a finished run prints: its folder, its metric's change, its bytes."""
    s = summary(result)
    print(f"run folder: {result.out_dir}")
    print(f"{s['metric']}: {s['initial']:.4f} at round 0 -> {s['final']:.4f} after {s['rounds']} rounds "
          f"of {s['clients']} clients{runtime}")
    print(f"bytes on the wire: {s['total_bytes']:,} (down {s['down_bytes']:,}, up {s['up_bytes']:,}); "
          f"nonzeros sent: down {s['down_nonzeros']:,}, up {s['up_nonzeros']:,}; wall {s['wall_s']:.0f} s")
