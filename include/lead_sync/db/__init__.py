"""The database toolkit the stages share, one module each:

bulk       many rows, each with values of its own, in one statement (COPY, unnest)
engines    the settings a dialect needs before an engine's first connection
key_reads  rows by key through psycopg2's own cursor, each key an index probe
keys       many keys in one query, as bounded lists of them
locks      one holder at a time across sessions: PostgreSQL's advisory locks
pg_copy    PostgreSQL's COPY ... FROM STDIN, in its text format
schema     the audit tables and views (their SQL in sql/), created by ensure_schema
stores     the warehouse and the optional state store, and what each keeps
stream     a large result a bounded number of rows at a time
upsert     insert-or-update in one statement, on every dialect we write to
"""
