"""Fine-tuning methods: what trains (every weight, LoRA adapters, a new word's embeddings), how each checks its
settings and exports what it made, and DreamBooth's class images."""
