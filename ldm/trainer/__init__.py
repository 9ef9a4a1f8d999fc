"""The diffusion trainer: its config schema, the stages it trains (text-to-image, super-resolution), the
objective, validation, export, and `train`."""
