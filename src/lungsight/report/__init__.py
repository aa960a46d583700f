"""Reports of a prediction: a self-contained HTML page."""

from lungsight.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
