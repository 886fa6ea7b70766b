# sepsnet: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: install test lint demo bench plugins clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py sepsnet/eval/_pq_native.c sepsnet/postprocess/_stuff_native.c  # setup.py builds the C helpers
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# one worker per core; a test file stays on one worker (its module fixtures are built once)
PYTEST_WORKERS ?= auto

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests/test_faults_kill.py  # forks trainers: a process whose autograd never ran
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests --ignore=tests/test_faults_kill.py

lint: install
	$(PY) -m ruff check .

SAMPLES := $(wildcard samples/coco_panoptic_sample/images/*.jpg)
BIN := $(VENV)/bin
DEMO_ITERS ?= 60

demo: install
	@echo "== 1. the network on the real sample photos: output shapes and parameter counts"
	$(PY) -m sepsnet.cli.shapes --config configs/tiny_synthetic.yaml $(SAMPLES)
	@echo "== 2. synthetic COCO-panoptic dataset"
	$(BIN)/sepsnet-synth --out $(DEMO)/synthetic --n 64 --val-n 8
	@echo "== 3. a short training run (the full proof of learning is benchmarks/learn_synthetic.py)"
	$(BIN)/sepsnet-train --config configs/tiny_synthetic.yaml --data $(DEMO)/synthetic --out $(DEMO)/train \
	    --resume --max-iter $(DEMO_ITERS) --no-progress --set solver.batch_size=4 solver.log_period=20 data.num_workers=1
	@echo "== 4. PQ on the synthetic val split"
	$(BIN)/sepsnet-eval --checkpoint $(DEMO)/train/model_final.pt --data $(DEMO)/synthetic --out $(DEMO)/eval --boundary
	@echo "== 5. export: ONNX bundle (TensorRT engines need TensorRT + an NVIDIA GPU)"
	$(BIN)/sepsnet-export $(DEMO)/train/model_final.pt --out $(DEMO)/bundle --onnx-only
	@echo "== 6. ONNX Runtime predictor on the real photos -> overlays"
	$(BIN)/sepsnet-demo --bundle $(DEMO)/bundle $(SAMPLES) --out $(DEMO)/overlays
	@echo "== 7. latency"
	$(BIN)/sepsnet-bench $(DEMO)/bundle --iters 20 --warmup 3 --json $(DEMO)/bench.json

bench: install
	$(PY) benchmarks/model_forward.py

# TensorRT plugin library build/plugins/libsepsnet_plugins.so (sepsnet-export --plugin finds it there).
# Needs the TensorRT SDK (TENSORRT_ROOT=/path/to/TensorRT) and nvcc; CUDA_ARCHS overrides the GPU list.
TENSORRT_ROOT ?=
CUDA_ARCHS    ?=
plugins:
	cmake -S cpp_plugins/roi_blend -B build/plugins -DCMAKE_BUILD_TYPE=Release \
	    $(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT)) \
	    $(if $(CUDA_ARCHS),-DCMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHS)")
	cmake --build build/plugins -j
	@test -f build/plugins/libsepsnet_plugins.so || { echo "libsepsnet_plugins.so was not built: see the cmake \
	messages above (TensorRT headers/libraries via TENSORRT_ROOT, a CUDA compiler)"; exit 1; }

clean:
	rm -rf $(DEMO) build *.egg-info
