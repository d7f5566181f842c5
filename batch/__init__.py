"""Offline jobs on Ray: build a dataset, generate bulk tours, evaluate a model (no HTTP here; serve/ is online)."""
