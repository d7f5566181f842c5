"""Datasets from textured meshes: loading, labels, walkable floors, ray casting, captions, builds."""
