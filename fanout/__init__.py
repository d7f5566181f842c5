"""Joining Ray and fanning work out on it: the one layer below batch/, trainer/ and serve/ that calls ray.init,
runs a bounded window of Ray tasks and a pool of Ray actors."""
