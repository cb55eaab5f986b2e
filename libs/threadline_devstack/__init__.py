"""Helpers that start the local stack (broker, Postgres, model server, services) for make run, tests, bench."""
