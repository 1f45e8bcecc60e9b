"""Mapping: source rows to lead events (values cleaned, keys, payloads), one rule set per source kind."""
