# The README's two commands: `make serve` (set up, export, serve) and `make test` (the whole suite).
PY      := .venv/bin/python
MODEL   ?= minilm_text
PYTEST_ARGS ?=
SERVE_ARGS  ?=
PERF_ARGS   ?=
BENCH_ARGS  ?=
BUNDLE_PYTHON ?= 3.12
TRT_ARGS    ?=

.PHONY: serve test test-llm setup export export-trt export-trt-docker export-llm-gpu doctor perf bench bench-ready bench-host bench-report bench-encoder-cpu bench-gateway soak bundle clean image deploy-check

serve: export ## set up, export the default models, run tritonserver + the gateway on 127.0.0.1:8000 (Ctrl-C stops both)
	$(PY) -m serve.launcher $(SERVE_ARGS)

test: export ## the whole test suite against real servers
	$(PY) -m pytest $(PYTEST_ARGS)

setup: ## .venv with pinned deps, tritonserver 2.51 (pytriton wheel), perf_analyzer
	bash serve/setup.sh

export: setup ## every default model of the repository (ONNX encoders, text pipeline, tiny LLM)
	$(PY) -m export

export-trt: setup ## TensorRT engines (needs TensorRT: see docs/tensorrt.md)
	$(PY) -m export.trt $(TRT_ARGS)

export-trt-docker: export ## TensorRT engines built in nvcr.io/nvidia/tensorrt:26.07-py3 (= the serving container's TensorRT)
	$(PY) -m export.trt --make-int8-source  # calibration needs transformers, which the build image lacks
	bash docker/build_engines.sh $(TRT_ARGS)

doctor: setup ## check this host for serving the repository
	$(PY) -m serve.doctor $(SERVE_ARGS)

perf: setup ## perf_analyzer against a running server: make perf MODEL=minilm PERF_ARGS="--concurrency-range 1:16:4"
	$(PY) -m serve.perf -m $(MODEL) $(PERF_ARGS)

test-llm: setup ## LLM engine + server tests only
	$(PY) -m pytest -q tests/test_llm_*.py $(PYTEST_ARGS)

export-llm-gpu: setup ## random TinyLlama/Llama-3.1-8B-shaped LLMs (run on the GPU host)
	$(PY) -m export.llm --random-shape tinyllama-1.1b --device cuda --kind gpu --name tinyllama
	$(PY) -m export.llm --random-shape llama-3.1-8b --device cuda --kind gpu --name llama8b

bench-encoder-cpu: export ## perf_analyzer sweep of the encoders and the text pipeline on this CPU (~8 min)
	$(PY) -m bench.encoder_cpu $(BENCH_ARGS)

bench-gateway: export ## the gateway's overhead vs direct gRPC, and AIPerf through /v1/chat/completions (CPU, ~12 min)
	$(PY) -m bench.gateway_overhead $(BENCH_ARGS)
	$(PY) -m bench.aiperf_gateway

soak: export ## 2x capacity for 3 minutes on embeddings and the streaming LLM through the gateway (not in CI)
	$(PY) -m bench.soak $(BENCH_ARGS)

bench: setup ## LLM benchmark through Triton + in-process + baselines + roofline (GPU host; docs/gpu.md)
	$(PY) -m bench.llm $(BENCH_ARGS)

bench-ready: setup ## server start-up, empty vs warm compile cache: 8B LLM and the compiled encoder (GPU host)
	$(PY) -m bench.ready_time $(or $(BENCH_ARGS),--llm llama-3.1-8b --encoder --starts 3)

bench-host: setup ## the engine thread's host work per decode step, device work replaced by no-ops (any CPU, ~1 min)
	$(PY) -m bench.host_work --concurrency 1 8 64 --repeats 7 --out results/cpu/host_work.json

bench-report: ## results/gpu JSON -> report.md + PNG plots (no GPU needed)
	bash bench/make_report.sh

bundle: setup ## offline bundle for a GPU host without registry access (< 64 MiB; docs/gpu.md)
	$(PY) -m serve.bundle --python $(BUNDLE_PYTHON) --out .bundle/bundle.tar.xz

IMAGE ?= triton-hf:26.07-py3
image: ## the serving image (docker/Dockerfile: NGC Triton 26.07 + our backends + the gateway); needs docker
	docker build -f docker/Dockerfile -t $(IMAGE) .

deploy-check: setup ## static checks of the container, compose and Kubernetes files, and the GPU placement (no docker or cluster needed)
	$(PY) -m pytest -q tests/test_deploy.py tests/test_placement.py tests/test_container.py $(PYTEST_ARGS)

clean: ## remove generated artifacts (not the venv)
	rm -rf build
	git clean -fdX model_repository tests/golden
