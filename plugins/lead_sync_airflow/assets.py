"""The Asset that downstream DAGs (dbt models, reports) schedule on."""
from __future__ import annotations

from airflow.sdk import Asset

# Updated by every run that changes the audit tables (lead_event_deliveries and the rest).
LEAD_EVENT_DELIVERIES = Asset("lead_event_deliveries")
