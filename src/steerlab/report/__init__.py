"""Reports: self-contained HTML pages with plots and tables."""

from steerlab.report.html import figure_html, page, table_html
from steerlab.report.steering import demo_report, summary_checks, terminal_summary

__all__ = ["demo_report", "figure_html", "page", "summary_checks", "table_html", "terminal_summary"]
