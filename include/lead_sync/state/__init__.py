"""State: recording mapped events against what the audit already holds, and the outbox of bodies to send.

`recording` records a partition batch by batch: what is held already (`on_record`), what each event
becomes (`decide`, with the event-2 rule in `judge`), the batch's writes (`writes`, into the audit
and the `outbox`). Mapped events wait in the `spool` until then; `writer` overlaps reading, deciding
and writing; `preview` is what a dry run stores instead.
"""
