"""HTML reports: report.html in every run directory, and one page comparing runs."""

from peftkit.report.compare import compare_runs
from peftkit.report.run_page import write_run_report

__all__ = ["compare_runs", "write_run_report"]
