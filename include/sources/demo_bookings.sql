SELECT
    customer_external_id,
    click_id,
    customer_name,
    customer_email,
    NULL AS customer_avatar,
    FALSE AS requires_verification,
    booked_at AS event_time
FROM demo_bookings
WHERE booked_at >= :window_start
  AND booked_at < :window_end
