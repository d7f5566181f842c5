"""Datasets from 360° captures: frames, structure from motion, alignment, builds."""
