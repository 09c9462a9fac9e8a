"""The run report: one self-contained HTML page (PNGs embedded) a user can send to a colleague."""

from raycp.report.html import Section, render_report

__all__ = ["Section", "render_report"]
