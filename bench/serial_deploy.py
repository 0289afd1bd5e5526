"""Cold and warm deploys of traffic_signs, with its whole test set, to a serial board throttled
to 115200 baud (issue #14, item 8: goals 10 min cold, 1 min warm).

    .venv/bin/doit compile:traffic_signs@rpi3      # the library and data it deploys (once)
    .venv/bin/python bench/serial_deploy.py [--app traffic_signs] [--type rpi3] [--baud 115200]

Starts an emulated serial board (a real pty, socat and the board's shell; a relay paces both
directions at baud/10 bytes/s, as a UART's 8N1 does) with an empty cache, then runs the hil
stage's own job (hil.deploy.job: upload, sha256 check, the runner under qemu, the front end's
check) twice over it:

- cold: nothing on the board, and no compressed copy on the host either (those of the files it
  sends are removed from build/cache/compressed first: their compression is in the time);
- warm: the runtime and test inputs cached on the board, a new model.so (the library with 64
  random bytes appended: a new sha256, the size and make-up of a retrained model's library; an
  ELF loader ignores bytes past its segments).

Prints per file the bytes raw / compressed / sent (payload) / on the wire and the seconds, the
steps' times and the totals; writes them to build/bench/serial_deploy.json. It takes about ten
minutes: run it with nothing else at work (the pacing relay and qemu need their CPU).

``--smoke``: the same cold and warm deploys over the same real pty board and qemu, of a tiny app
it builds first for rpi3 (bench/_smoke.py: 8 validation samples) at 4,000,000 baud: under a
minute once built; the goals are printed but mean nothing there.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hil.deploy import job  # noqa: E402
from hil.emulator.pty_board import relay_stats, start_serial_board, stop_serial_board  # noqa: E402
from hil.upload_codec import compressed_cache  # noqa: E402
from kiln import schema  # noqa: E402
from kiln.artifacts import Layout, build_root, runner_dir, sha256_file, write_json  # noqa: E402
from kiln.config import load_board, load_project  # noqa: E402

GOALS_S = {"cold": 600.0, "warm": 60.0}


class NewModel:
    """The app's layout, but its library for the board type is another file (the warm deploy's
    new model), so the build's own library is never touched."""

    def __init__(self, layout: Layout, model: Path):
        self._layout, self._model = layout, model

    def library(self, board_type: str) -> Path:
        return self._model

    def __getattr__(self, name):
        return getattr(self._layout, name)


class Uploads(logging.Handler):
    """Collects hil.deploy's per-file upload records (``kiln_upload`` on its log records)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.rows: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "kiln_upload"):
            self.rows.append(dict(record.kiln_upload))


def one_deploy(what: str, project, board, live, layout, lab_dir: Path) -> dict:
    handler = Uploads()
    lg = logging.getLogger(f"kiln.board.{live.name}")
    lg.addHandler(handler)
    t0 = time.perf_counter()
    try:
        record = job(project, board, live, layout, lab_dir, f"bench-{what}")
    finally:
        lg.removeHandler(handler)
    wall = time.perf_counter() - t0
    if record.get("error"):
        raise SystemExit(f"{what} deploy failed: {record['error']}")
    return {"what": what, "wall_s": round(wall, 1), "timings_s": record["timings_s"], "files": handler.rows,
            "count": record["runner"]["count"]}


def print_result(r: dict) -> None:
    print(f"\n{r['what']} deploy: {r['count']} test samples, {r['wall_s']:.1f} s "
          f"(goal {GOALS_S[r['what']]:.0f} s: {'met' if r['wall_s'] <= GOALS_S[r['what']] else 'MISSED'})")
    cols = ("file", "codec", "raw B", "compressed B", "sent B", "wire B", "compress s", "upload s", "unpack s")
    print("  " + "".join(f"{c:>14}" if i else f"{c:<22}" for i, c in enumerate(cols)))
    tot = {k: 0.0 for k in ("raw_bytes", "compressed_bytes", "sent_bytes", "wire_bytes", "compress_s",
                            "upload_s", "unpack_s")}
    for f in r["files"]:
        for k in tot:
            tot[k] += f.get(k) or 0
        print(f"  {f['file']:<22}{f['codec']:>14}{f['raw_bytes']:>14,}{f['compressed_bytes']:>14,}"
              f"{f['sent_bytes']:>14,}{(f['wire_bytes'] or 0):>14,}{f['compress_s']:>14.1f}{f['upload_s']:>14.1f}"
              f"{f['unpack_s']:>14.1f}")
    print(f"  {'total':<22}{'':>14}{int(tot['raw_bytes']):>14,}{int(tot['compressed_bytes']):>14,}"
          f"{int(tot['sent_bytes']):>14,}{int(tot['wire_bytes']):>14,}{tot['compress_s']:>14.1f}"
          f"{tot['upload_s']:>14.1f}{tot['unpack_s']:>14.1f}")
    print("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings_s"].items()))
    r["totals"] = {k: round(v, 3) for k, v in tot.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="traffic_signs")
    ap.add_argument("--type", default="rpi3", help="board type of the serial board (its library is deployed)")
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--smoke", action="store_true", help="a tiny app built first for rpi3, 4,000,000 baud")
    a = ap.parse_args()
    if a.smoke:
        from bench._smoke import tiny_app

        a.type, a.baud = "rpi3", 4_000_000
        a.app = tiny_app(f"compile:tiny@{a.type}", "runner:aarch64")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    project, board, layout = load_project(a.app), load_board(a.type), Layout(a.app)
    model = layout.library(board.name)
    if not model.is_file() or not (layout.data / "test_inputs.bin").is_file():
        raise SystemExit(f"no {model} or test inputs: run .venv/bin/doit compile:{a.app}@{a.type} first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = start_serial_board("serial-bench", tmp / "boards", {"baud": a.baud})
        try:
            spec = schema.SerialTransport.model_validate(b.transport_spec(baud=a.baud))
            live = schema.Instance(name=b.name, type=board.name, transport=spec, emulated=True)
            # cold: no compressed copy on the host of anything this deploy sends
            for f in [*runner_dir(board.arch).glob("*"), *layout.data.glob("*.bin"), model,
                      layout.board_type(board.name) / "front_end.so"]:
                if f.is_file():
                    for c in compressed_cache().glob(f"{sha256_file(f)}.*"):
                        c.unlink()
            cold = one_deploy("cold", project, board, live, layout, tmp)
            print_result(cold)
            # warm: a new model.so (new sha256), everything else cached on the board
            new_model = tmp / "model.so"
            shutil.copyfile(model, new_model)
            with open(new_model, "ab") as f:
                f.write(os.urandom(64))
            warm = one_deploy("warm", project, board, live, NewModel(layout, new_model), tmp)
            print_result(warm)
            print(f"\nrelay (both directions, at {a.baud} baud): {relay_stats(b)}")
        finally:
            stop_serial_board(b)
    write_json(build_root() / "bench" / "serial_deploy.json", {"app": a.app, "type": a.type, "baud": a.baud,
                                                              "deploys": [cold, warm], "goals_s": GOALS_S})
    return 0 if cold["wall_s"] <= GOALS_S["cold"] and warm["wall_s"] <= GOALS_S["warm"] else 1


if __name__ == "__main__":
    sys.exit(main())
