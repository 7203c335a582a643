# Two commands do all the set-up on a fresh machine:
#   make run    install (pinned, into .venv) and run the default pipeline: dvc repro
#   make test   install (pinned, into .venv) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.resops-installed

.PHONY: install run quality test bench figures clean-venv

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/dvc repro

quality: $(STAMP)  # the quality preset (presets/quality.yaml) as a DVC experiment: ~30 min of training
	PATH="$(CURDIR)/$(BIN):$$PATH" WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/dvc exp run $$($(BIN)/python -m pipelines.presets quality)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q --durations=25

figures: $(STAMP)  # README tables from metrics/*.json and benchmarks/results/*.json (tools/figures.py)
	$(BIN)/python tools/figures.py

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
