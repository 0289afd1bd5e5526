"""``python -m hil.lab [--lab LAB.yaml] power <board> on|off|cycle``: switch a board's power by
hand (hil/lab/power.py), as recovery does. The lab file is the default lab unless given; a board
it does not list, or one with no power control, is an error naming the lab's boards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiln.config import DEFAULT_LAB
from kiln.errors import KilnError
from kiln.registry import implementation


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m hil.lab", description="The lab's boards by hand")
    parser.add_argument("--lab", type=Path, default=DEFAULT_LAB, help=f"lab file (default {DEFAULT_LAB})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pw = sub.add_parser("power", help="switch a board's power")
    pw.add_argument("board")
    pw.add_argument("action", choices=("on", "off", "cycle"))
    args = parser.parse_args(argv)
    from hil.lab import describe
    from hil.lab.power import switch

    try:
        lab = describe(args.lab)
        boards = {b.name: b for b in lab.boards}
        inst = boards.get(args.board)
        if inst is None:
            print(f"kiln: no board '{args.board}' in lab {args.lab} (its boards: {', '.join(boards) or 'none'})",
                  file=sys.stderr)
            return 1
        backend = implementation(lab)
        if inst.power is None and hasattr(backend, "default_power"):
            inst = inst.model_copy(update={"power": backend.default_power(inst, lab)})
        if inst.power is None:
            with_power = [n for n, b in boards.items() if b.power is not None]
            print(f"kiln: board '{args.board}' of lab {args.lab} has no power control (boards with one: "
                  f"{', '.join(with_power) or 'none'})", file=sys.stderr)
            return 1
        seconds = switch(inst, args.action)
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    print(f"{args.board}: power {args.action} ({seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
