"""Audit: runs and their summaries, the report, alerts, and publishing the audit to the warehouse."""
