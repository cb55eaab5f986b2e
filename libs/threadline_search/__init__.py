"""Files to searchable chunks: parsing, chunking, embeddings, the Qdrant index and file_search.

Importing this package is cheap: the ML libraries (onnxruntime, tokenizers, unstructured) are imported
only by the functions that need them, so the gateway can use the pure helpers without loading them.
"""
