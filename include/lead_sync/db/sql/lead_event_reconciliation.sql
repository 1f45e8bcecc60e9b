-- Every source row accounted for, per partition and source, as the latest read found them:
-- source_rows = delivered + rejected + failed + skipped + pending - no_longer_in_source
--               + repeat + unaccounted, and unaccounted is 0 when every row is an event on
-- record (whatever its status) or a repeat of one. no_longer_in_source: events on record
-- whose row that read did not yield (deleted or moved since); their status is counted above.
CREATE VIEW lead_event_reconciliation AS
SELECT
    r.partition_date,
    r.source,
    r.rows_read AS source_rows,
    COALESCE(s.delivered, 0) AS delivered,
    COALESCE(s.rejected, 0) AS rejected,
    COALESCE(s.failed, 0) AS failed,
    COALESCE(s.skipped, 0) AS skipped,
    COALESCE(s.pending, 0) AS pending,
    r.repeats AS repeat,
    r.missing AS no_longer_in_source,
    r.rows_read - r.repeats - (COALESCE(s.total, 0) - r.missing) AS unaccounted,
    r.run_id AS read_by_run,
    r.read_at
FROM lead_event_source_reads r
LEFT JOIN (
    SELECT
        partition_date,
        source,
        SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END) AS delivered,
        SUM(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END) AS rejected,
        SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
        SUM(CASE WHEN status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
        SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) AS pending,
        COUNT(*) AS total
    FROM lead_event_deliveries
    GROUP BY partition_date, source
) s ON s.partition_date = r.partition_date AND s.source = r.source
WHERE r.id = (
    SELECT MAX(x.id) FROM lead_event_source_reads x
    WHERE x.partition_date = r.partition_date AND x.source = r.source
)
