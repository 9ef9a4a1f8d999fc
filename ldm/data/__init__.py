"""Data: sources read through `datasets`, image transforms, aspect buckets, splits, the batch plan of every step,
caches of what frozen networks compute, masks, and the built-in datasets."""
