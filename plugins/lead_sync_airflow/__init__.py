"""Airflow hooks and operators for the lead-event sync; the logic lives in `lead_sync`."""
