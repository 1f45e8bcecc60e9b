"""The database toolkit: the audit schema and views, bulk writes, engines and the stores (warehouse, state store)."""
