SELECT
    customer_external_id,
    click_id,
    customer_name,
    customer_email,
    customer_avatar,
    requires_verification,
    signed_up_at AS event_time
FROM signups
WHERE signed_up_at >= :window_start
  AND signed_up_at < :window_end
