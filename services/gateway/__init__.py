"""The public HTTP API (OpenAI Assistants v2 compatible), auth, SSE streams, webhook registration."""
