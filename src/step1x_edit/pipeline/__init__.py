"""Pre/post-processing and the sampling loop on top of `models`."""
