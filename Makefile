# Two entry points for a fresh clone with only Python 3.11 and pip: `make demo` and `make test`.
# Both create .venv (reused when present) and install the kit from constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench paper samples lock clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pinned release, so no resolver picks a different build
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(BIN)/covtoken run jobs/g1_lesion_subspace.py --smoke --results gate_reports
	$(BIN)/covtoken audit gate_reports

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

paper: install
	$(BIN)/covtoken paper build
	$(BIN)/covtoken paper verify

# G1 on the small real-data samples beside the repository (../shared/realdata), as sample runs
REALDATA ?= ../shared/realdata
samples: install
	$(BIN)/covtoken run jobs/g1_lesion_subspace.py --results gate_reports/samples -- --dataset busi --data-root $(REALDATA)/busi --sample-run
	$(BIN)/covtoken run jobs/g1_lesion_subspace.py --results gate_reports/samples -- --dataset lidc --data-root $(REALDATA)/lidc_idri --sample-run
	$(BIN)/covtoken audit gate_reports

bench: install
	$(BIN)/python tests/bench_stats.py
	$(BIN)/python tests/bench_classifier.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Pinned versions every install and every job uses (pip install -c constraints.txt ...).\n# Regenerate with: make lock' > constraints.txt

clean-venv:
	rm -rf $(VENV)
