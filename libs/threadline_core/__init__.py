"""Shared, importable building blocks of every Threadline service (never run on its own)."""
