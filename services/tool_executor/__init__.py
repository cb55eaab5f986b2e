"""Runs server-side tools (code_interpreter, file_search)."""
