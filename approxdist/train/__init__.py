"""`approxdist-train`: the training application (see `approxdist.train.train`)."""
