"""Delivers signed webhooks for every public event."""
