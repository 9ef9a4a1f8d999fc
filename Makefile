# One-command set-up and run. `make demo` trains on the built-in shapes data and scores the result;
# `make test` runs the fast CPU test suite. Both create .venv and install everything first.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
# The CPU build of torch on machines without a GPU; override with TORCH_SPEC="torch==X" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP     := $(VENV)/.installed
# `accelerate launch` sets OMP_NUM_THREADS=1 for a CPU run unless told otherwise: give it every core.
NPROC     := $(shell nproc 2>/dev/null || echo 1)
LAUNCH    := $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
             --dynamo_backend no --num_cpu_threads_per_process $(NPROC)

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-xl lora-demo ti-demo mask-demo cascade-demo variance-study variance-study-full app lint test test-slow vae clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so that no dependency pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Train on `shapes` with the shipped VAE, export runs/demo/pipeline, then score 96 images of
# held-out prompts into runs/demo/samples.png and runs/demo/metrics.json.
demo: $(STAMP)
	$(LAUNCH) train_ldm.py --config configs/ldm/shapes.yaml name=demo train.score_num_images=0
	$(BIN)/python -m ldm.evaluate --pipeline runs/demo/pipeline --dataset shapes --num-images 96 \
		--guidance-scale 1.5 --out runs/demo

# The same data on a small Stable Diffusion XL-architecture model (two text encoders, SDXL's size/crop conditions)
# trained on random 32 px crops of the images resized to 40 px: runs/demo-xl/pipeline, scored like `make demo` at the
# centred crop condition (4, 4) into runs/demo-xl/metrics.json, then the same prompts drawn under five crop
# conditions into runs/demo-xl/crops/results.json and grid.png (demos/crop_demo.py).
demo-xl: $(STAMP)
	$(LAUNCH) train_ldm.py --config configs/ldm/shapes-xl.yaml name=demo-xl train.score_num_images=0
	$(BIN)/python -m ldm.evaluate --pipeline runs/demo-xl/pipeline --dataset shapes --num-images 96 \
		--guidance-scale 1.5 --crop 4 4 --out runs/demo-xl
	$(BIN)/python -m demos.crop_demo --pipeline runs/demo-xl/pipeline --out runs/demo-xl/crops

# Teach the demo's model a colour it never saw (orange) with LoRA from 32 images, then score base vs LoRA
# into runs/lora-orange/metrics.json. Runs `make demo` first when its pipeline is missing.
lora-demo: $(STAMP)
	test -f runs/demo/pipeline/model_index.json || $(MAKE) demo
	$(BIN)/python -m demos.lora_demo --base runs/demo/pipeline --concept orange --out runs/lora-orange

# The same colour taught by textual inversion (only the embedding of a new token "<orange>" learns):
# runs/ti-orange/metrics.json.
ti-demo: $(STAMP)
	test -f runs/demo/pipeline/model_index.json || $(MAKE) demo
	$(BIN)/python -m demos.lora_demo --method textual_inversion --base runs/demo/pipeline --out runs/ti-orange

# Orange taught from images whose background is noise, with LoRA on every pixel and with a masked loss (the mask
# covers the shape): runs/mask-demo/metrics.json and grid.png.
mask-demo: $(STAMP)
	test -f runs/demo/pipeline/model_index.json || $(MAKE) demo
	$(BIN)/python -m demos.mask_demo --base runs/demo/pipeline --out runs/mask-demo

# A cascade: the demo's 32 px model, then a super-resolution stage to 128 px trained with and without conditioning
# augmentation, scored at 128 px at augmentation levels 0/100/250/500: runs/cascade-demo/results.json, grid.png and
# the cascade folder runs/cascade-demo/cascade. Runs `make demo` first when its pipeline is missing.
cascade-demo: $(STAMP)
	test -f runs/demo/pipeline/model_index.json || $(MAKE) demo
	$(BIN)/python -m demos.cascade_demo --base runs/demo/pipeline --out runs/cascade-demo

# Fixed vs learned variance vs the bound alone, same budget and seed, sampled at 10-250 steps with DDPM and
# DDIM, scored and bounded: runs/variance-study/results.json and quality_vs_steps.png (docs/results.md).
variance-study: $(STAMP)
	$(BIN)/python -m demos.variance_study --out runs/variance-study

# The same study on converged models, on latents and on pixels, each cell with a bootstrap 95% band: about 2 hours
# on 2 cores; run it again to go on after an interruption. runs/variance-study-full/ (docs/results.md).
variance-study-full: $(STAMP)
	$(BIN)/python -m demos.variance_study --plan full --out runs/variance-study-full

# The web page on http://127.0.0.1:7860: draw with any pipeline under runs/ and watch runs (ldm/app.py).
PORT ?= 7860
app: $(STAMP)
	$(BIN)/python -m ldm.app --runs-dir runs --port $(PORT)

# ruff: pyflakes, import order, complexity and statement bounds (pyproject.toml [tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Retrain the shipped VAE (autoencoder/pretrained/builtin) from its recipe: two stages, about 110 minutes.
vae: $(STAMP)
	$(LAUNCH) train_autoencoder.py --config configs/autoencoder/builtin.yaml
	$(LAUNCH) train_autoencoder.py --config configs/autoencoder/builtin-smooth.yaml

clean:
	rm -rf runs .cache data
