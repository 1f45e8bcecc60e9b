-- Deliveries per day: per partition, source, event name and status, the events and the
-- requests made for them (every attempt, answered or not), first and last attempt.
CREATE VIEW lead_event_daily AS
SELECT
    partition_date,
    source,
    event_name,
    status,
    COUNT(*) AS events,
    COALESCE(SUM(attempts), 0) AS requests,
    MIN(first_attempt_at) AS first_attempt_at,
    MAX(last_attempt_at) AS last_attempt_at
FROM lead_event_deliveries
GROUP BY partition_date, source, event_name, status
