-- Demo warehouse (SQLite): signups, verifications and demo bookings around 2026-11-27.
-- Loaded once into an empty file by `make demo`; the SQL is plain enough to adapt.
CREATE TABLE signups (
    customer_external_id INTEGER,
    click_id TEXT,
    customer_name TEXT,
    customer_email TEXT,
    customer_avatar TEXT,
    signed_up_at TIMESTAMP,
    requires_verification BOOLEAN
);
CREATE TABLE verifications (
    customer_external_id TEXT,
    event_name TEXT,
    verified_at TIMESTAMP
);
CREATE TABLE demo_bookings (
    customer_external_id INTEGER,
    click_id TEXT,
    customer_name TEXT,
    customer_email TEXT,
    booked_at TIMESTAMP
);

-- 30 signups on 2026-11-27: every third needs email verification.
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO signups
SELECT 1000 + i,
       'clk_' || printf('%04d', i),
       'Demo User ' || i,
       'user' || i || '@example.com',
       CASE WHEN i % 5 = 0 THEN 'https://avatars.example.com/' || i || '.png' END,
       datetime('2026-11-27 00:00:00', '+' || (i * 45) || ' minutes'),
       i % 3 = 0
FROM n;

-- Rows the mapping rules must handle.
INSERT INTO signups VALUES
    (1031, NULL, 'No Click', 'noclick@example.com', NULL, '2026-11-27 09:15:00', 0),      -- skipped: no click_id
    (NULL, 'clk_orphan', 'No Id', 'noid@example.com', NULL, '2026-11-27 09:20:00', 0),  -- skipped: no customer id
    (1032, 'clk_0032', 'Bad Email', 'not-an-email', 'ftp://x', '2026-11-27 10:00:00', 0), -- sent, email and avatar left out
    (1001, 'clk_dup', 'Demo User 1', 'user1@example.com', NULL, '2026-11-27 22:00:00', 0), -- a repeat of customer 1001
    (1033, 'clk_0033', 'Late Verifier', 'late@example.com', NULL, '2026-11-27 23:30:00', 1), -- verified next day
    (1034, 'clk_0034', 'Next Day', 'next@example.com', NULL, '2026-11-28 08:00:00', 0);   -- partition 2026-11-28

-- Verifications: ids stored as text, some with stray whitespace.
INSERT INTO verifications
SELECT ' ' || customer_external_id || ' ', 'email_verified', datetime(signed_up_at, '+20 minutes')
FROM signups
WHERE requires_verification AND customer_external_id <= 1030 AND customer_external_id % 2 = 1;
INSERT INTO verifications
SELECT customer_external_id, 'email_verified', datetime(signed_up_at, '+3 minutes')
FROM signups
WHERE requires_verification AND customer_external_id <= 1030 AND customer_external_id % 2 = 0;
INSERT INTO verifications VALUES
    ('1002', 'email_verified', '2026-11-27 12:00:00'),  -- skipped: 1002's signup was non-deferred
    ('1033', 'email_verified', '2026-11-28 00:10:00');  -- partition 2026-11-28

INSERT INTO demo_bookings VALUES
    (1005, 'clk_0005', 'Demo User 5', 'user5@example.com', '2026-11-27 14:00:00'),
    (1010, 'clk_0010', 'Demo User 10', 'user10@example.com', '2026-11-27 15:30:00'),
    (2001, 'clk_b2001', 'Booker One', 'booker1@example.com', '2026-11-27 16:00:00'),
    (2002, 'clk_b2002', 'Booker Two', 'booker2@example.com', '2026-11-27 17:45:00');
