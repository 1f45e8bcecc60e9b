-- A separate state store (PostgreSQL, connection lead_sync_state) copies the audit tables to the
-- warehouse in batches. Every write to a row gives it a new audit_seq; the copy records the
-- audit_seq it wrote as published_seq, so a row changed since (or never copied) is copied next
-- time, whatever order concurrent writers commit in.
CREATE SEQUENCE IF NOT EXISTS lead_sync_audit_seq;

CREATE OR REPLACE FUNCTION lead_sync_mark_changed() RETURNS trigger AS $$
BEGIN
    -- The copy recording what it wrote is not a change of the row.
    IF TG_OP = 'UPDATE' AND NEW.published_seq IS DISTINCT FROM OLD.published_seq THEN
        RETURN NEW;
    END IF;
    NEW.audit_seq := nextval('lead_sync_audit_seq');
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
