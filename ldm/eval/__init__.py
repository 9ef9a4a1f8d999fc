"""Evaluation: image metrics that need no download, the built-in scorers, sample scores against real images, and
the likelihood bound."""
