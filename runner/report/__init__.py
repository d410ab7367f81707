"""Runs in MLflow -> paper-style tables (mean +- std over seeds) and plots: `python -m runner.report`."""

from runner.report.errors import ReportError
from runner.report.make import make_report
from runner.report.select import select_runs
from runner.report.table import Style, Table, aggregate, to_frame, to_latex, to_markdown

__all__ = [
    "ReportError",
    "Style",
    "Table",
    "aggregate",
    "make_report",
    "select_runs",
    "to_frame",
    "to_latex",
    "to_markdown",
]
