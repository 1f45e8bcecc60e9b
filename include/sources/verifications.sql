SELECT
    customer_external_id,
    event_name,
    verified_at AS event_time
FROM verifications
WHERE verified_at >= :window_start
  AND verified_at < :window_end
