"""The networks a run is built from: the frozen VAE (or pixel space), the tokenizer and text encoder, the U-Net
and the training schedule, new or from a pretrained folder."""
