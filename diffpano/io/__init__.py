"""Storage, manifests and outputs: URIs (local, s3://), Parquet manifests, compaction, videos."""
