"""One self-contained HTML page per nightly: what broke, where, since when, with plots, and for
a classifier each board's per-class truth (a confusion-matrix table with every class's recall,
precision and F1, and the macro-F1: an HTML table, shaded, not a plot, so its numbers are text).

The page fetches nothing: no script, no font, no image by URL; the plots are inline <svg> drawn
by matplotlib's SVG backend (house rule 9) with text left as text (``svg.fonttype = 'none'``,
the smallest form), and a Content-Security-Policy of ``default-src 'none'`` so that even a page
opened from a CI artifact server cannot reach out. It is deterministic: the SVG metadata
(date, creator) is dropped and the ids matplotlib hashes are salted with a constant, so the same
nightly and history give the same bytes.

``history`` is duck-typed, as hil/history.py offers it: ``history(app, board, metric, last)``
-> [(run_id, started, value)] oldest first, and ``health_history(board, last)`` -> [(at,
state)]. "Since when" reads the "passed" metric (1/0) through ``history`` rather than
``last_status(before=run_id)``, so the page is the same whether tonight is recorded yet or not.
Without a history the page has tonight only (no "since when", no trends, no health over time)
and says so.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import re
from itertools import takewhile
from pathlib import Path

import matplotlib
import matplotlib.dates as mdates
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from kiln.artifacts import write_bytes

NIGHTS = 30          # nights of history in the trend plots
SINCE_NIGHTS = 90    # how far back "failing since" looks
STATUS_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "infra": "#ef6c00",
                 "not_validated": "#757575", "skipped": "#9e9e9e"}
HEALTH_COLORS = {"good": "#2e7d32", "unknown": "#9e9e9e", "bad": "#c62828",
                 "maintenance": "#1565c0", "retired": "#424242"}
RC = {"svg.fonttype": "none", "svg.hashsalt": "kiln", "font.family": "sans-serif",
      "font.sans-serif": ["DejaVu Sans"], "font.size": 8, "axes.titlesize": 9,
      "axes.spines.top": False, "axes.spines.right": False}
SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}

CSS = """body{font:14px/1.4 sans-serif;margin:1.5em;color:#212121}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
td.st{color:#fff;font-weight:bold;white-space:nowrap}
.pass{background:#2e7d32}.fail{background:#c62828}.infra{background:#ef6c00}
.not_validated{background:#757575}.skipped{background:#9e9e9e}.none{background:#fafafa;color:#999}
.flaky{outline:3px solid #fdd835;outline-offset:-3px}
.h-good{color:#2e7d32}.h-bad{color:#c62828;font-weight:bold}.h-unknown{color:#757575}
.h-maintenance{color:#1565c0}.h-retired{color:#424242}
ul.broken li{margin:.2em 0}small{color:#616161}svg.plot{max-width:100%;height:auto;display:block;margin:.5em 0}
svg.plot text{font-family:'DejaVu Sans',sans-serif}
table.confusion td{text-align:right;min-width:1.6em}table.confusion caption{text-align:left;font-weight:bold}
table.confusion td.pc{background:#f5f5f5}details{margin:.4em 0}"""
OPEN_UP_TO = 12  # a confusion matrix of at most this many classes is shown open; larger ones fold

e = html.escape


def _time(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _day(iso: str) -> str:
    return _time(iso).strftime("%Y-%m-%d %H:%M")


def _quality(job: dict) -> tuple[str, float | None]:
    """The job's quality metric: an anomaly detector's AUC, a regressor's MAE, a detector's F1 of
    centres, else a classifier's accuracy."""
    m = job["metrics"]
    if m.get("auc") is not None:
        return "auc", m["auc"]
    if m.get("f1") is not None:
        return "f1", m["f1"]
    return ("mae", m["mae"]) if m.get("mae") is not None else ("accuracy", m.get("accuracy"))


def _latency(job: dict) -> float | None:
    """The contract's comparable latency: median of the windows, else the p50."""
    m = job["metrics"]
    if m.get("latency_ms_median_of_windows") is not None:
        return m["latency_ms_median_of_windows"]
    return m["latency_ms"]["p50"] if m.get("latency_ms") else None


def _failed_text(job: dict) -> str:
    """Why a job is not a pass, in one line."""
    failed = [r for r in job["requirements"] if r["verdict"] == "fail"]
    if failed:
        return "; ".join(f"{r['name']} {r['measured']:.4g} (required {r['op']} {r['limit']:.4g})" for r in failed)
    if job.get("error"):
        return f"{job['error']['step']}: {job['error']['message']}"
    return job.get("reason") or job["status"]


# ---- plots -------------------------------------------------------------------------------

def _round(m: re.Match) -> str:
    """A coordinate attribute with its numbers at 2 decimals: a hundredth of a point is
    finer than any screen, and matplotlib's 6 decimals are a third of a plot's bytes."""
    value = re.sub(r"-?\d+\.\d{3,}", lambda n: f"{float(n[0]):.2f}".rstrip("0").rstrip("."), m[2])
    return f'{m[1]}"{value}"'


def _unwrap_bare_groups(s: str) -> str:
    """Drop <g> elements that have no attribute left (ids stripped): they group nothing."""
    out, stack, pos = [], [], 0
    for m in re.finditer(r"<g>|<g\s[^>]*>|</g>", s):
        out.append(s[pos:m.start()])
        pos = m.end()
        if m[0] == "</g>":
            if not stack.pop():
                out.append(m[0])
        else:
            stack.append(m[0] == "<g>")
            if m[0] != "<g>":
                out.append(m[0])
    out.append(s[pos:])
    return "".join(out)


def _svg(fig: Figure, prefix: str, label: str) -> str:
    """``fig`` as an <svg> element to inline: no XML prolog, no namespace URIs (HTML knows
    them), ids kept only where referenced and prefixed per plot (matplotlib's ids repeat from
    one figure to the next), the font named once in the page's CSS, coordinates rounded,
    empty groups and whitespace between tags dropped."""
    buf = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", s)
    s = re.sub(r"<metadata>.*?</metadata>", "", s, flags=re.S)
    refs = set(re.findall(r'(?:href="#|url\(#)([^")]+)', s))
    s = re.sub(r'\sid="([^"]+)"', lambda m: f' id="{prefix}-{m[1]}"' if m[1] in refs else "", s)
    s = re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m[1]}{prefix}-{m[2]}", s)
    s = re.sub(r"font-family: [^;\"]*;? ?", "", s)
    s = re.sub(r' transform="rotate\(-?0 [^)]*\)"', "", s)
    s = re.sub(r'(\s(?:d|x|y|width|height|transform|viewBox)=)"([^"]*)"', _round, s)
    s = re.sub(r"\s*\n\s*", " ", s)
    s = re.sub(r">\s+<", "><", s)
    s = _unwrap_bare_groups(s)
    return s.replace("<svg ", f'<svg class="plot" role="img" aria-label="{e(label)}" ', 1)


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _latency_plot(board: str, info: dict, jobs: list[dict], prefix: str) -> str | None:
    """Per board: the distribution of each app's latency windows (box), its p99 (x) and the
    latency limits it was held to (|). None when no job on the board measured latency."""
    rows = [j for j in jobs if j["metrics"].get("latency_windows_ms") or j["metrics"].get("latency_ms")]
    if not rows:
        return None
    with matplotlib.rc_context(RC):
        fig = _figure(6.0, 0.8 + 0.35 * len(rows))
        ax = fig.add_subplot()
        for y, j in enumerate(rows, 1):
            m = j["metrics"]
            lat = m.get("latency_ms") or {}
            data = m.get("latency_windows_ms") or [lat[k] for k in ("min", "p50", "p90", "p99", "max")]
            ax.boxplot([data], positions=[y], orientation="horizontal", widths=0.5,
                       patch_artist=True, boxprops={"facecolor": STATUS_COLORS[j["status"]] + "66"},
                       medianprops={"color": "#212121"}, flierprops={"markersize": 3})
            if lat:
                ax.plot([lat["p99"]], [y], "x", color="#212121", markersize=4)
            for r in j["requirements"]:
                if r["name"].startswith("latency"):
                    ax.plot([r["limit"]], [y], "|", color="#c62828", markersize=10)
        ax.set_yticks(range(1, len(rows) + 1), [j["app"] for j in rows])
        ax.invert_yaxis()  # first app on top, as in the table
        ax.set_xlabel("latency per window, ms (box); x: p99; red |: limit")
        emu = any(j["metrics"].get("emulated") for j in rows)
        ax.set_title(f"{board} ({info.get('type', '?')})" + (" - emulated: latency not enforced" if emu else ""))
    return _svg(fig, prefix, f"latency distribution on {board}")


def _series(history, nightly: dict, job: dict, metric: str, value: float | None):
    """(times, values) of ``metric`` over the last nights, tonight appended if not yet recorded."""
    rows = history.history(job["app"], job["board"], metric, last=NIGHTS)
    points = [(_time(started), v) for run_id, started, v in rows if v is not None]
    if value is not None and all(run_id != nightly["run_id"] for run_id, _, _ in rows):
        points.append((_time(nightly["started"]), value))
    return [p[0] for p in points], [p[1] for p in points]


def _emulated_boards(nightly: dict) -> set[str]:
    """Boards some job measured under emulation tonight (a job that failed early says nothing)."""
    return {j["board"] for j in nightly["jobs"] if j["metrics"].get("emulated")}


def _trend_plot(app: str, jobs: list[dict], nightly: dict, history, prefix: str) -> str | None:
    """Per app: quality and latency across nights, one line per board; a board keeps its
    colour from one app's plot to the next."""
    boards = sorted(nightly["boards"])
    emulated = _emulated_boards(nightly)
    metric = next((k for k in ("auc", "mae", "f1") if any(j["metrics"].get(k) is not None for j in jobs)), "accuracy")
    with matplotlib.rc_context(RC):
        fig = _figure(7.0, 2.2)
        axq, axl = fig.subplots(1, 2)
        drawn = False
        for j in jobs:
            tq, vq = _series(history, nightly, j, metric, _quality(j)[1])
            tl, vl = _series(history, nightly, j, "latency_ms", _latency(j))
            style = "--" if j["board"] in emulated else "-"
            color = f"C{boards.index(j['board']) % 10}" if j["board"] in boards else "#000000"
            # lines only, the latest night marked: a marker per night is most of a plot's bytes
            if vq:
                axq.plot(tq, vq, style, color=color, marker="o", markersize=3, markevery=[-1], linewidth=1, label=j["board"])
            if vl:
                axl.plot(tl, vl, style, color=color, marker="o", markersize=3, markevery=[-1], linewidth=1, label=j["board"])
            drawn = drawn or bool(vq or vl)
        if not drawn:
            return None
        axq.set_title(f"{app}: {metric}")
        axl.set_title(f"{app}: latency, ms (dashed: emulated)")
        # emulated boards run tens of times slower: a log scale keeps every board's line readable
        axl.set_yscale("log")
        for ax in (axq, axl):
            loc = mdates.AutoDateLocator(maxticks=5)
            ax.xaxis.set_major_locator(loc)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
        axl.legend(fontsize=6, frameon=False, loc="best")
    return _svg(fig, prefix, f"{app} accuracy and latency across nights")


def _health_plot(nightly: dict, history, prefix: str) -> str | None:
    """Board health over time: one bar per board, coloured by its state in each interval."""
    end = _time(nightly["finished"])
    boards = sorted(nightly["boards"])
    with matplotlib.rc_context(RC):
        fig = _figure(7.0, 0.7 + 0.3 * len(boards))
        ax = fig.add_subplot()
        seen = set()
        for y, board in enumerate(boards):
            samples = sorted((_time(at), state) for at, state in history.health_history(board, last=NIGHTS))
            samples.append((end, nightly["boards"][board]["health"]))
            # one bar per stretch in one state, not one per night
            changes = [c for i, c in enumerate(samples) if i == 0 or c[1] != samples[i - 1][1]]
            changes.append(samples[-1])
            for (t0, state), (t1, _) in zip(changes, changes[1:]):
                x0, x1 = mdates.date2num(t0), mdates.date2num(t1)
                ax.broken_barh([(x0, max(x1 - x0, 1e-3))], (y - 0.35, 0.7),
                               color=HEALTH_COLORS.get(state, "#000000"),
                               label=None if state in seen else state)
                seen.add(state)
        if not seen:
            return None
        ax.set_yticks(range(len(boards)), boards)
        ax.xaxis_date()
        loc = mdates.AutoDateLocator(maxticks=6)
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
        ax.set_title("board health over time")
        ax.legend(fontsize=6, frameon=False, ncols=len(seen), loc="upper left", bbox_to_anchor=(0, -0.15))
    return _svg(fig, prefix, "board health over time")


# ---- sections ----------------------------------------------------------------------------

def _since(job: dict, nightly: dict, history) -> str:
    """Since when this app on this board has been broken, from its "passed" history (1/0 on
    nights that gave a verdict). Tonight is left out whether or not it is recorded yet."""
    if history is None:
        return ""
    tonight = _time(nightly["started"])
    rows = [r for r in history.history(job["app"], job["board"], "passed", last=SINCE_NIGHTS + 1)
            if r[0] != nightly["run_id"] and _time(r[1]) <= tonight][-SINCE_NIGHTS:]
    if not rows:
        return "first night on record"
    if rows[-1][2] >= 0.5:
        return "new tonight (passed the night before)"
    streak = list(takewhile(lambda r: r[2] < 0.5, reversed(rows)))
    more = " or more" if len(streak) == SINCE_NIGHTS else ""
    return f"broken since {_day(streak[-1][1])} ({len(streak) + 1}{more} nights)"


def _glance(nightly: dict, history) -> str:
    """What broke, on which board, since when: the part read first in the morning."""
    jobs = nightly["jobs"]
    count = {s: sum(j["status"] == s for j in jobs) for s in STATUS_COLORS}
    flaky = [j for j in jobs if j["flaky"]]
    verdict = {0: "all passed", 1: "regressions or failed requirements",
               2: "infrastructure failures only"}[nightly["exit_code"]]
    parts = [f"{len(jobs)} jobs: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in count.items() if n),
             f"{len(flaky)} flaky", f"{len(nightly['regressions'])} regressions"]
    items = []
    for j in sorted(jobs, key=lambda j: (j["status"] != "fail", j["app"], j["board"])):
        if j["status"] in ("fail", "infra"):
            since = _since(j, nightly, history)
            console = (j.get("error") or {}).get("console")
            log_html = (f'<details><summary>the board\'s console ({e(console["source"])}), last '
                        f'{len(console["lines"])} lines</summary><pre>{e(chr(10).join(console["lines"]))}</pre>'
                        f'</details>' if console else "")
            items.append(f'<li><b>{e(j["app"])}</b> on <b>{e(j["board"])}</b>: '
                         f'<span class="{j["status"]}" style="color:#fff;padding:0 .3em">{j["status"].upper()}</span> '
                         f'{e(_failed_text(j))}{" <small>— " + e(since) + "</small>" if since else ""}{log_html}</li>')
    for r in nightly["regressions"]:
        items.append(f'<li><b>{e(r["app"])}</b> on <b>{e(r["board"])}</b>: regression in {e(r["metric"])}: '
                     f'{e(r["message"])}</li>')
    for name, b in sorted(nightly["boards"].items()):
        if b["health"] in ("bad", "maintenance", "retired"):
            why = (b.get("check") or {}).get("error") or ""
            items.append(f'<li>board <b>{e(name)}</b> is <span class="h-{b["health"]}">{b["health"]}</span>'
                         f'{": " + e(why) if why else ""}; its jobs were skipped</li>')
    for j in flaky:
        items.append(f'<li><b>{e(j["app"])}</b> on <b>{e(j["board"])}</b> passed only after a retry '
                     f'(flaky): {e(", ".join(a["board"] + " " + a["outcome"] for a in j["attempts"]))}</li>')
    body = f'<ul class="broken">{"".join(items)}</ul>' if items else "<p>Nothing broke tonight.</p>"
    note = "" if history is not None else "<p><small>No history given: no 'since when', trends or health over time.</small></p>"
    return (f'<h2>At a glance</h2><p><b>exit {nightly["exit_code"]}: {verdict}</b> — {e("; ".join(parts))}</p>'
            f"{body}{note}")


def _cell(job: dict | None) -> str:
    if job is None:
        return '<td class="none">—</td>'
    q_name, q = _quality(job)
    lat = _latency(job)
    f1 = job["metrics"].get("macro_f1")
    shown = "" if q is None else f"MAE {q:.4g}" if q_name == "mae" else f"{ {'auc': 'auc', 'f1': 'F1'}.get(q_name, 'acc')} {q:.3f}"
    bits = [shown,
            f"R² {job['metrics']['r2']:.3f}" if job["metrics"].get("r2") is not None else "",
            f"F1 {f1:.3f}" if f1 is not None else "",
            f"{lat:.3g} ms{'*' if job['metrics'].get('emulated') else ''}" if lat is not None else ""]
    detail = "; ".join(f"{r['name']} {r['measured']:.4g} {r['op']} {r['limit']:.4g}: {r['verdict']}"
                       for r in job["requirements"]) or _failed_text(job)
    flaky = " flaky" if job["flaky"] else ""
    word = job["status"].replace("_", " ") + (" (flaky)" if job["flaky"] else "")
    return (f'<td class="st {job["status"]}{flaky}" title="{e(detail)}">{e(word)}'
            f'<br><small style="color:#fff">{e(" · ".join(b for b in bits if b))}</small></td>')


def _matrix(nightly: dict) -> str:
    """The app x board table, cells coloured by status."""
    boards = sorted(set(nightly["boards"]) | {j["board"] for j in nightly["jobs"]})
    apps = sorted({j["app"] for j in nightly["jobs"]})
    by = {(j["app"], j["board"]): j for j in nightly["jobs"]}
    head = "".join(
        f'<th>{e(b)}<br><small>{e(nightly["boards"].get(b, {}).get("type", "?"))} · '
        f'<span class="h-{nightly["boards"].get(b, {}).get("health", "unknown")}">'
        f'{e(nightly["boards"].get(b, {}).get("health", "?"))}</span></small></th>' for b in boards)
    rows = "".join(f"<tr><th>{e(a)}</th>{''.join(_cell(by.get((a, b))) for b in boards)}</tr>" for a in apps)
    return (f'<h2>Apps × boards</h2><table id="matrix"><tr><th>app</th>{head}</tr>{rows}</table>'
            "<p><small>* latency measured under emulation: reported, not enforced. "
            "Yellow frame: flaky (passed only after an infrastructure retry). Hover a cell for its requirements.</small></p>")


def _shade(share: float, diagonal: bool) -> str:
    """A cell's background: green on the diagonal (right), red off it (wrong), as strong as the
    share of the true class's samples in it."""
    if share <= 0:
        return ""
    alpha = max(0.08, min(1.0, share)) * (0.7 if diagonal else 0.85)
    color = "46,125,50" if diagonal else "198,40,40"
    return f' style="background:rgba({color},{alpha:.2f})"'


def _num(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _confusion_table(job: dict, ident: str) -> str:
    """One board's confusion matrix (true class by row, predicted by column; counts, shaded by the
    share of the row) with each class's recall, precision, F1 and support beside its row."""
    m = job["metrics"]
    cm, classes, per = m["confusion"]["matrix"], m["confusion"]["classes"], m.get("per_class") or {}
    head = "".join(f"<th>{e(c)}</th>" for c in classes)
    rows = []
    for i, (c, row) in enumerate(zip(classes, cm)):
        total = sum(row) or 1
        cells = "".join(f"<td{_shade(v / total, i == j)}>{v}</td>" for j, v in enumerate(row))
        pc = per.get(c, {})
        rows.append(f"<tr><th>{e(c)}</th>{cells}<td class=\"pc\">{_num(pc.get('recall'))}</td>"
                    f"<td class=\"pc\">{_num(pc.get('precision'))}</td><td class=\"pc\">{_num(pc.get('f1'))}</td>"
                    f"<td class=\"pc\">{pc.get('support', sum(row))}</td></tr>")
    ranked = sorted((v["recall"], c) for c, v in per.items() if v.get("recall") is not None)
    worst = ", ".join(f"{c} {r:.3f}" for r, c in ranked[:3])
    summary = (f"<b>{e(job['board'])}</b>: macro-F1 {_num(m.get('macro_f1'))}, accuracy {_num(m.get('accuracy'))}"
               + (f"; lowest recall: {e(worst)}" if worst else ""))
    table = (f'<table class="confusion" id="{ident}"><caption>{e(job["app"])} on {e(job["board"])}: true class by row, '
             f"predicted class by column</caption><tr><th>true \\ predicted</th>{head}<th>recall</th><th>precision</th>"
             f"<th>F1</th><th>n</th></tr>{''.join(rows)}</table>")
    return f"<details{' open' if len(classes) <= OPEN_UP_TO else ''}><summary>{summary}</summary>{table}</details>"


def _per_class(nightly: dict) -> str:
    """Per app, each board's per-class truth: the confusion matrix and every class's recall,
    precision and F1 (a classifier's; Edge Impulse shows the same in every test report)."""
    jobs = [j for j in sorted(nightly["jobs"], key=lambda j: (j["app"], j["board"]))
            if (j["metrics"].get("confusion") or {}).get("matrix")]
    if not jobs:
        return ""
    out, app = ["<h2>Per class</h2><p><small>Confusion matrix per board (true class by row, predicted class by column; "
                "green: right, red: wrong, as strong as the share of the true class), each class's recall "
                "(its accuracy), precision and F1, and the macro-F1.</small></p>"], None
    for i, j in enumerate(jobs):
        if j["app"] != app:
            app = j["app"]
            out.append(f"<h3>{e(app)}</h3>")
        out.append(_confusion_table(j, f"cm{i}"))
    return "".join(out)


def _regressions(nightly: dict) -> str:
    regs = nightly["regressions"]
    if not regs:
        return "<h2>Regressions</h2><p>None flagged.</p>"
    def num(v):
        return "—" if v is None else f"{v:.4g}"
    rows = "".join(f"<tr><td>{e(r['app'])}</td><td>{e(r['board'])}</td><td>{e(r['metric'])}</td>"
                   f"<td>{num(r['value'])}</td><td>{num(r['baseline'])}</td><td>{num(r['tolerance'])}</td>"
                   f"<td>{e(r['kind'])}</td><td>{e(r['message'])}</td></tr>" for r in regs)
    return ('<h2>Regressions</h2><table id="regressions"><tr><th>app</th><th>board</th><th>metric</th>'
            "<th>value</th><th>baseline</th><th>tolerance</th><th>kind</th><th>message</th></tr>"
            f"{rows}</table>")


def _boards(nightly: dict, history) -> str:
    rows = []
    for name, b in sorted(nightly["boards"].items()):
        c = b.get("check")
        check = "not checked" if c is None else (
            f"{'passed' if c['passed'] else 'FAILED'} in {c['seconds']:.1f} s" + (f": {c['error']}" if c.get("error") else ""))
        if c is not None and c.get("first"):
            f = c["first"]
            check = f"FAILED in {f['seconds']:.1f} s: {f.get('error')}; after a power cycle: {check}"
        cycles = "; ".join(
            f"{'ok' if p['passed'] else 'FAILED'} in {p['seconds']:.1f} s ({p['reason']})"
            + (f": {p['error']}" if p.get("error") else "")
            + ("" if p.get("check") is None else f", check after it {'passed' if p['check']['passed'] else 'FAILED'}")
            for p in b.get("power_cycles") or []) or "none"
        rows.append(f'<tr><td>{e(name)}</td><td>{e(b["type"])}</td>'
                    f'<td class="h-{b["health"]}">{b["health"]}</td><td>{e(check)}</td><td>{e(cycles)}</td></tr>')
    plot = _health_plot(nightly, history, "health") if history is not None else None
    return ('<h2>Boards</h2><table id="boards"><tr><th>board</th><th>type</th><th>health</th>'
            f'<th>health check</th><th>power cycles</th></tr>{"".join(rows)}</table>{plot or ""}')


def render(nightly: dict, history=None) -> str:
    """The page of a (validated) nightly result, as a string."""
    by_board: dict[str, list[dict]] = {}
    by_app: dict[str, list[dict]] = {}
    for j in sorted(nightly["jobs"], key=lambda j: (j["app"], j["board"])):
        by_board.setdefault(j["board"], []).append(j)
        by_app.setdefault(j["app"], []).append(j)
    lat = [_latency_plot(b, nightly["boards"].get(b, {}), by_board[b], f"lat{i}")
           for i, b in enumerate(sorted(by_board))]
    trends = []
    if history is not None:
        trends = [_trend_plot(a, by_app[a], nightly, history, f"trend{i}") for i, a in enumerate(sorted(by_app))]
    title = f"Kiln nightly {nightly['run_id']}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><p>lab <b>{e(nightly['lab'])}</b> on {e(nightly['host'])}, "
        f"{e(_day(nightly['started']))} UTC, {nightly['wall_s']:.0f} s</p>"
        + _glance(nightly, history) + _matrix(nightly) + _regressions(nightly) + _per_class(nightly)
        + _boards(nightly, history)
        + "<h2>Latency per board</h2>" + ("".join(p for p in lat if p) or "<p>No latency measured.</p>")
        + ("<h2>Across nights</h2>" + "".join(p for p in trends if p) if history is not None else "")
        + "</body></html>\n")


def write_html(nightly: dict, path: str | Path, history=None) -> int:
    """Write the page atomically; returns its size in bytes."""
    data = render(nightly, history).encode()
    write_bytes(path, data)
    return len(data)
