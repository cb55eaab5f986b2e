"""Parses, chunks, embeds and indexes files into Qdrant."""
