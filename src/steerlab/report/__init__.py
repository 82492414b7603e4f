"""What every report shares: self-contained HTML pages with inline plots and tables."""

from steerlab.report.html import figure_html, page, table_html

__all__ = ["figure_html", "page", "table_html"]
