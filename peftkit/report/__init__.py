"""HTML reports: report.html in every run directory, and one page comparing runs."""

from peftkit.report.compare import compare_runs
from peftkit.report.run_page import refresh_run_report, write_run_report

__all__ = ["compare_runs", "refresh_run_report", "write_run_report"]
