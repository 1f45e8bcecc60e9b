-- Per audit table of a state store: the change marks and the trigger that sets them (see
-- state_store.sql); {table} is the table's name.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS audit_seq bigint;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS published_seq bigint;
CREATE INDEX IF NOT EXISTS ix_{table}_unpublished ON {table} (audit_seq)
    WHERE published_seq IS DISTINCT FROM audit_seq;
CREATE OR REPLACE TRIGGER {table}_changed BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION lead_sync_mark_changed();
