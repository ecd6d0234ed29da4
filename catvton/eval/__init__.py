"""Metrics and evaluation reports (evaluation issue)."""
