"""State: recording mapped events against what the audit already holds, and the outbox of bodies to send."""
