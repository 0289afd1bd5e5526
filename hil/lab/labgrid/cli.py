"""``python -m hil.lab.labgrid``: Kiln's view of a labgrid lab (places, holders, leases, health),
a place's health for every runner, a place held by hand, a reaper that runs until stopped (the
usage is in the package's docstring)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hil.lab.labgrid import HEALTH_AT_TAG, HEALTH_TAG, LEASE_TAG, TYPE_TAG, acquire_place, client_for, close_clients
from hil.lab.labgrid.client import Client
from kiln.errors import KilnError, ManifestError


def _hold(c: Client, place: str, for_s: float | None, wait_s: float) -> int:
    import json

    t0 = time.monotonic()
    lease = acquire_place(c, place, wait=wait_s > 0, timeout_s=wait_s)
    say = lambda **kw: print(json.dumps({"place": place, "identity": c.identity, "t": time.time(), **kw}), flush=True)  # noqa: E731
    if lease is None:
        say(state="busy", waited_s=round(time.monotonic() - t0, 3))
        return 3
    say(state="held", waited_s=round(time.monotonic() - t0, 3))
    with lease:
        while for_s is None or time.monotonic() - t0 < for_s:
            say(state="lost" if lease.lost else "held", reason=lease.lost_reason, re_leased=lease.re_leased,
                renewals=lease.seq)
            time.sleep(1.0)
    say(state="released" if not lease.lost_reason else "lost", reason=lease.lost_reason)
    return 0 if not lease.lost_reason else 4


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from kiln.config import load_lab

    default = os.environ.get("KILN_LAB") or str(Path(__file__).resolve().parents[2] / "emulator" / "multihost.yaml")
    ap = argparse.ArgumentParser(prog="python -m hil.lab.labgrid", description="Kiln's view of a labgrid lab.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("places", help="places, holders, leases and health")
    pl.add_argument("lab", nargs="?", default=default)
    h = sub.add_parser("health", help="set a place's health for every runner")
    h.add_argument("place")
    h.add_argument("state", choices=["good", "bad", "maintenance", "retired"])
    h.add_argument("--reason", required=True)
    h.add_argument("lab", nargs="?", default=default)
    r = sub.add_parser("reap", help="run a reaper until stopped")
    r.add_argument("lab", nargs="?", default=default)
    hd = sub.add_parser("hold", help="hold a place (by hand: maintenance, a debug session) until ^C or --for; "
                        "prints one JSON line a second: the lease's state")
    hd.add_argument("place")
    hd.add_argument("lab", nargs="?", default=default)
    hd.add_argument("--for", dest="for_s", type=float, default=None, help="seconds to hold it (default: until ^C)")
    hd.add_argument("--wait", type=float, default=0.0, help="seconds to wait for it when busy (default: none)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        lab = load_lab(Path(a.lab))
        if getattr(lab, "backend", None) != "labgrid":
            raise ManifestError(f"{a.lab}: field 'backend': '{lab.backend}', expected 'labgrid'")
        c = client_for(lab)
        if a.cmd == "places":
            for name, p in sorted(c.places().items()):
                t = p["tags"]
                print(f"{name:<16} type={t.get(TYPE_TAG, '-'):<10} health={t.get(HEALTH_TAG, '-'):<11} "
                      f"held by {p['acquired'] or '-'}  lease {t.get(LEASE_TAG) or '-'}")
        elif a.cmd == "health":
            c.set_tags(a.place, **{HEALTH_TAG: a.state, HEALTH_AT_TAG: str(int(time.time()))})
            from hil.lab import health

            health.set_state(a.place, a.state, a.reason)
            print(f"{a.place}: {a.state} ({a.reason})")
        elif a.cmd == "hold":
            return _hold(c, a.place, a.for_s, a.wait)
        else:
            print(f"reaping for {c.address} as {c.identity} (ttl {c.ttl_s:g} s); ^C stops", flush=True)
            while True:
                time.sleep(3600)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        close_clients()
    return 0
