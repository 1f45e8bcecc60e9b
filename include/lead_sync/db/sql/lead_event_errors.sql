-- What was not delivered, and why: per partition, last HTTP status and reason, the events
-- and one example event_key to look up.
CREATE VIEW lead_event_errors AS
SELECT
    partition_date,
    http_status,
    reason,
    COUNT(*) AS events,
    MIN(event_key) AS example_event_key
FROM lead_event_deliveries
WHERE status <> 'delivered' AND reason IS NOT NULL
GROUP BY partition_date, http_status, reason
