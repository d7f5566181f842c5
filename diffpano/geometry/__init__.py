"""Spherical geometry: equirectangular maps, poses, projections, reprojection, trajectories."""
