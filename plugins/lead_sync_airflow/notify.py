"""Alerts out through Airflow's notifiers: e-mail via `smtp_default`, Slack via a webhook connection.

What to send is decided by `lead_sync.audit.alerts`; this module only delivers it and records
each alert once every configured channel took it.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from airflow.sdk import Context
from sqlalchemy.engine import Engine

from lead_sync.audit import alerts
from lead_sync.audit.runs import RunSummary
from lead_sync.read.config import AlertsConfig

log = logging.getLogger(__name__)

SMTP_CONN_ID = "smtp_default"


def slack_text(text: str) -> str:
    """Slack reads `<...>` as links and mentions (`<!channel>`): quoted text must not."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _send_email(cfg: AlertsConfig, alert: alerts.Alert, context: Context) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    # .notify(), not the notifier's __call__: that would render the message as a Jinja
    # template, and reasons quoted from the API may contain "{{".
    SmtpNotifier(to=list(cfg.email), subject=alert.subject, html_content=alert.html,
                 smtp_conn_id=SMTP_CONN_ID).notify(context)


def _send_slack(cfg: AlertsConfig, alert: alerts.Alert, context: Context) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=cfg.slack_conn_id, text=slack_text(alert.text)).notify(context)


def raise_alerts(engine: Engine, cfg: AlertsConfig | None, summary: RunSummary, context: Context,
                 now: datetime | None = None) -> int:
    """Send the alerts and recoveries this run calls for; returns how many were sent.

    No `alerts` configuration: nothing at all. An alert is recorded as sent only once every
    configured channel took it, so one that could not be sent is raised again by the next
    run. If any could not be sent, the others are still tried, then RuntimeError.
    """
    if cfg is None:
        return 0
    now = now or datetime.now(timezone.utc)
    due = alerts.evaluate(engine, cfg, summary, now)
    channels = []
    if cfg.email:
        channels.append(("e-mail", _send_email))
    if cfg.slack_conn_id:
        channels.append(("Slack", _send_slack))
    if due and not channels:
        log.warning("alerts configured with neither e-mail nor Slack: %d alert(s) only logged here", len(due))
    sent = 0
    failures: dict[str, int] = {}
    unsent = 0
    for alert in due:
        log.warning("%s\n%s", alert.subject, alert.text)
        ok = True
        for name, send in channels:
            try:
                send(cfg, alert, context)
            except Exception:
                log.exception("alert %r could not be sent by %s", alert.key, name)
                failures[name] = failures.get(name, 0) + 1
                ok = False
        if ok:
            alerts.mark_sent(engine, [alert], now)
            sent += 1
        else:
            unsent += 1
    if unsent:
        how = ", ".join(f"{name}: {n} failed" for name, n in failures.items())
        raise RuntimeError(f"{unsent} of {len(due)} alert(s) could not be sent ({how}); "
                           "see the errors above; the next run raises them again")
    return sent
