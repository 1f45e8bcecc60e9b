"""Delivery: the CutMeShort client, its settings, the shared rate limit, claims on open events and the sender."""
