"""Data: image sources, encoders, grouping embeddings and retrieval, MDS shards and the streaming loaders."""
