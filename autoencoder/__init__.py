"""The first stage of a latent diffusion model: train, fine-tune and evaluate KL autoencoders (diffusers
``AutoencoderKL``) with the same engine as the diffusion trainer. The VAE for the built-in datasets ships in
``pretrained/builtin``."""
