"""Evaluation metrics: distribution (FID, IS, CLIP score, FAED), paired, multi-view consistency, seam, adherence."""
