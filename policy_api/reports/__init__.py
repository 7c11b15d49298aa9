"""Reports people read: HTML pages with tables and labelled PNG plots (replay, training, the demo)."""

from ._evaluate import write_evaluation_report
from ._html import html_page, mean_se, pyplot, table_html
from ._write import write_replay_report, write_train_report

__all__ = [
    "html_page",
    "mean_se",
    "pyplot",
    "table_html",
    "write_evaluation_report",
    "write_replay_report",
    "write_train_report",
]
