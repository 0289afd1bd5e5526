"""Reports. deploy.py: the deploy stage's report, one JSON per app with every board's verdict
(build/<app>/report.json) and a table for the terminal. The nightly reports, from one
``nightly.json`` (schema ``kiln-nightly/1``, schema.py): JUnit XML for CI (junit.py) and one
self-contained HTML page with inline SVG plots (html.py).

The modules are imported when a report is written, not with this package: html.py brings in
matplotlib, and nothing that lists tasks should pay for that.
"""

from __future__ import annotations

from pathlib import Path


def write_reports(nightly: dict, out_dir: str | Path, history=None) -> dict[str, Path]:
    """Validate ``nightly`` and write ``junit.xml`` and ``report.html`` into ``out_dir``
    (next to the nightly.json the orchestrator wrote); returns their paths by format."""
    from hil.reports.html import write_html
    from hil.reports.junit import write_junit
    from hil.reports.schema import validate

    validate(nightly)
    out = Path(out_dir)
    paths = {"junit": out / "junit.xml", "html": out / "report.html"}
    write_junit(nightly, paths["junit"])
    write_html(nightly, paths["html"], history)
    return paths
