"""Upload throughput and payload efficiency over the emulated lab's links, side by side.

Starts one real sshd board and one real serial (pty) board, uploads the same random file over
each with Kiln's transports, and prints bytes/s and payload efficiency (payload bytes / bytes on
the wire, both directions: for SSH counted by a loopback TCP proxy in front of sshd, for serial
by the transport's own counters). Run: .venv/bin/python bench/hil_upload.py [--mb 20] [--repeat 3]
(``--smoke``: the same real boards and table for 0.1 MB, one run each: seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hil.emulator.faults import TCPProxy  # noqa: E402
from hil.emulator.pty_board import start_serial_board, stop_serial_board  # noqa: E402
from hil.emulator.sshd import start_sshd, stop_sshd  # noqa: E402
from hil.transport.serial import SerialTransport  # noqa: E402
from hil.transport.ssh import SSHTransport  # noqa: E402
from kiln import schema  # noqa: E402


def timed_puts(t, src: Path, repeat: int) -> list[float]:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        t.put(src, f"bench-{i}.bin")
        times.append(time.perf_counter() - t0)
        t.run(["rm", "-f", f"bench-{i}.bin"], timeout=60)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="0.1 MB, one run each: seconds")
    a = ap.parse_args()
    if a.smoke:
        a.mb, a.repeat = 0.1, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "payload.bin"
        src.write_bytes(os.urandom(int(a.mb * 1e6)))
        size = src.stat().st_size

        board = start_sshd("kiln-bench", tmp / "ssh")
        try:
            with SSHTransport("kiln-bench", schema.SSHTransport(**board.transport_spec()), tmp) as t:
                times = timed_puts(t, src, a.repeat)
            with TCPProxy((board.host, board.port)) as proxy:
                kh = tmp / "kh"
                kh.write_text(board.known_hosts_entry(proxy.host, proxy.port))
                spec = board.transport_spec(host=proxy.host, port=proxy.port, known_hosts=str(kh))
                with SSHTransport("kiln-bench", schema.SSHTransport(**spec), tmp) as t:
                    before = proxy.passed  # after connect + auth: count the upload alone
                    t.put(src, "bench-eff.bin")
                    wire = proxy.passed - before
            rows.append(("ssh (sftp)", f"{board.host}:{board.port}", size, times, size / wire))
        finally:
            stop_sshd(board)

        sb = start_serial_board("kiln-bench-tty", tmp / "serial")
        try:
            with SerialTransport("kiln-bench-tty", schema.SerialTransport(**sb.transport_spec()), tmp) as t:
                before = dict(t.stats)
                times = timed_puts(t, src, a.repeat)
                payload = t.stats["payload_bytes"] - before["payload_bytes"]
                wire = sum(t.stats[k] - before[k] for k in ("wire_bytes_out", "wire_bytes_in"))
            rows.append(("serial (pty)", sb.tty, size, times, payload / wire))
        finally:
            stop_serial_board(sb)

    print(f"upload of {size:,} random bytes, {a.repeat} runs each (median, min..max)")
    print(f"{'link':<14} {'endpoint':<44} {'MB/s median':>12} {'min..max MB/s':>16} {'payload eff.':>13}")
    for name, where, n, times, eff in rows:
        rates = [n / s / 1e6 for s in times]
        print(f"{name:<14} {where[-44:]:<44} {statistics.median(rates):>12.2f} "
              f"{min(rates):>7.2f}..{max(rates):<7.2f} {eff * 100:>12.1f}%")
    ssh_rate = statistics.median(rows[0][2] / s for s in rows[0][3])
    ser_rate = statistics.median(rows[1][2] / s for s in rows[1][3])
    print(f"ratio ssh/serial throughput: {ssh_rate / ser_rate:.1f}x; hex lines would be 50.0% efficient")
    return 0


if __name__ == "__main__":
    sys.exit(main())
