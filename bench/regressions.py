"""False positives and detection of the nightly regression rule, on simulated boards.

    .venv/bin/python bench/regressions.py [--boards 200] [--nights 100] [--seed 0]
    .venv/bin/python bench/regressions.py --smoke    # 4 boards x 64 nights: the same tables in a second

Every verdict comes from hil.history.judge, the very rule hil.history.regressions applies to
a night (baseline = median of the last 14 nights of the same app on the same board, tolerance =
max(3 x 1.4826 x MAD, floor x |baseline|), floors 5 % latency, 1 % accuracy and AUC, 0 bytes;
no metric compared before 5 nights).

The noise model (the default rows; tests/hil/test_history.py uses the same one):
  latency   each inference lognormal, CV drawn per board from 3-5 %; a night runs 5 windows of 40
            back-to-back inferences and reports the median of the window medians (MLPerf Tiny's
            way); the board's state that night (clock, temperature, memory layout) scales the
            whole night by a lognormal of CV 1 %; on 1 night in 50 an interference burst makes
            1-2 consecutive windows +30 % slower.
  accuracy  1000 test samples; the number right jitters uniformly by -3..+3 samples.
  auc       jitters uniformly by +-0.002 around 0.93.
  size      constant (a build is deterministic).
Stress rows change one thing: the night-to-night CV (2, 3, 5 %: a board whose clock is not
pinned), or outlier bursts that cover the whole night (all 5 windows +30 %), which no rule
that looks at one night can tell from a real 30 % slowdown.

A change starts on night 50 and stays; "night 1" is the share of boards flagged on its first
night, "<=3" within three nights, "nights" the median night of the first flag among detected
boards; "missed" the share not flagged within 14 nights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hil.history import judge  # noqa: E402

WINDOW, K, MIN_HISTORY, ONSET, HORIZON = 14, 3.0, 5, 50, 14


def latency(rng, boards, nights, night_cv=0.01, burst_p=1 / 50, burst_windows=(1, 2), windows=5,
            per_window=40, base_ms=4.0) -> np.ndarray:
    """(boards, nights) median-of-windows latencies under the noise model."""
    cv = rng.uniform(0.03, 0.05, size=(boards, 1, 1, 1))
    s = np.sqrt(np.log1p(cv ** 2))
    runs = base_ms * np.exp(rng.normal(-s * s / 2, s, size=(boards, nights, windows, per_window)))
    sn = math.sqrt(math.log1p(night_cv ** 2))
    runs *= np.exp(rng.normal(-sn * sn / 2, sn, size=(boards, nights, 1, 1)))
    hit = rng.random((boards, nights)) < burst_p
    length = rng.integers(burst_windows[0], burst_windows[1] + 1, size=(boards, nights))
    first = rng.integers(0, windows - length + 1)
    w = np.arange(windows)
    burst = hit[..., None] & (w >= first[..., None]) & (w < (first + length)[..., None])
    runs[burst] *= 1.30
    return np.median(np.median(runs, axis=3), axis=2)


def accuracy(rng, boards, nights, correct=953, samples=1000) -> np.ndarray:
    return (correct + rng.integers(-3, 4, size=(boards, nights))) / samples


def auc(rng, boards, nights) -> np.ndarray:
    return 0.93 + rng.uniform(-0.002, 0.002, size=(boards, nights))


def flags(metric: str, values: np.ndarray, nights: range) -> np.ndarray:
    """(boards, len(nights)) bool: each night judged against the nights before it."""
    out = np.zeros((values.shape[0], len(nights)), dtype=bool)
    for b, row in enumerate(values.tolist()):
        for i, t in enumerate(nights):
            out[b, i] = judge(metric, row[t], row[max(0, t - WINDOW):t], K, None, MIN_HISTORY)["flagged"]
    return out


def false_positives(metric: str, values: np.ndarray) -> tuple[float, float]:
    """(share of judged board-nights flagged, share of boards flagged at least once)."""
    f = flags(metric, values, range(MIN_HISTORY, values.shape[1]))
    return f.mean(), f.any(axis=1).mean()


def detection(metric: str, values: np.ndarray, change) -> tuple[float, float, float, float]:
    """(flagged night 1, within 3 nights, median nights to the first flag, missed) after
    ``change`` (values -> values) is applied from night ONSET on."""
    v = values.copy()
    v[:, ONSET:] = change(v[:, ONSET:])
    f = flags(metric, v, range(ONSET, ONSET + HORIZON))
    hit = f.any(axis=1)
    first = np.argmax(f, axis=1) + 1
    med = float(np.median(first[hit])) if hit.any() else float("nan")
    return f[:, 0].mean(), f[:, :3].any(axis=1).mean(), med, 1 - hit.mean()


def pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boards", type=int, default=200)
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help=f"4 boards x {ONSET + HORIZON} nights (the fewest that "
                    "reach the detection horizon): a second, shares meaningless")
    a = ap.parse_args()
    if a.smoke:
        a.boards, a.nights = 4, ONSET + HORIZON
    if a.nights < ONSET + HORIZON:
        ap.error(f"--nights must be at least {ONSET + HORIZON} (changes start on night {ONSET}, judged for {HORIZON})")
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    B, N = a.boards, a.nights
    print(f"{B} simulated boards x {N} nights; window {WINDOW}, k {K}, min history {MIN_HISTORY}; "
          f"changes start on night {ONSET}\n")

    print("False positives (unchanged code)")
    print(f"{'noise':58s} {'board-nights':>12s} {'boards with any':>16s}")
    rows = [("latency, default model (see docstring)", "latency_ms", latency(rng, B, N)),
            ("latency, night-to-night CV 2 %", "latency_ms", latency(rng, B, N, night_cv=0.02)),
            ("latency, night-to-night CV 3 %", "latency_ms", latency(rng, B, N, night_cv=0.03)),
            ("latency, night-to-night CV 5 %", "latency_ms", latency(rng, B, N, night_cv=0.05)),
            ("latency, default + 1/50 bursts over the WHOLE night", "latency_ms",
             latency(rng, B, N, burst_windows=(5, 5))),
            ("accuracy, 1000 samples, +-3 samples jitter", "accuracy", accuracy(rng, B, N)),
            ("auc, +-0.002 jitter", "auc", auc(rng, B, N)),
            ("model_bytes, constant", "model_bytes", np.full((B, N), 61_440.0))]
    for name, metric, v in rows:
        nightly, boards = false_positives(metric, v)
        print(f"{name:58s} {pct(nightly):>12s} {pct(boards):>16s}")

    print("\nDetection (the change persists from its first night)")
    print(f"{'change':58s} {'night 1':>8s} {'<=3':>8s} {'nights':>7s} {'missed':>8s}")
    default, cv3, cv5 = latency(rng, B, N), latency(rng, B, N, night_cv=0.03), latency(rng, B, N, night_cv=0.05)
    acc, au = accuracy(rng, B, N), auc(rng, B, N)
    cases = [(f"latency +{s}%, default model", "latency_ms", default, lambda x, s=s: x * (1 + s / 100))
             for s in (5, 10, 20)]
    cases += [(f"latency +{s}%, night-to-night CV 3 %", "latency_ms", cv3, lambda x, s=s: x * (1 + s / 100))
              for s in (10, 20)]
    cases += [(f"latency +{s}%, night-to-night CV 5 %", "latency_ms", cv5, lambda x, s=s: x * (1 + s / 100))
              for s in (10, 20)]
    cases += [(f"accuracy -{p} point{'s' if p > 1 else ''}", "accuracy", acc, lambda x, p=p: x - p / 100)
              for p in (1, 2, 3, 5)]
    cases += [(f"auc -{d}", "auc", au, lambda x, d=d: x - d) for d in (0.01, 0.02)]
    cases += [("model_bytes +1 byte", "model_bytes", np.full((B, N), 61_440.0), lambda x: x + 1)]
    for name, metric, v, change in cases:
        d1, d3, med, missed = detection(metric, v, change)
        print(f"{name:58s} {pct(d1):>8s} {pct(d3):>8s} {med:7.1f} {pct(missed):>8s}")
    print(f"\n{time.perf_counter() - t0:.1f} s; command: .venv/bin/python bench/regressions.py "
          f"--boards {B} --nights {N} --seed {a.seed}")


if __name__ == "__main__":
    main()
