"""Studies: one command each, training and scoring several models with the same budget and seed."""
