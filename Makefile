# Entry points for a fresh clone with only Python 3.11 and pip: `make demo`, `make test-fast`, `make test`.
# All create .venv (reused when present) and install the kit from constraints.txt.
# Your runs go to results/ (untracked); the committed gate_reports/ change only when asked
# (`covtoken run ... --results gate_reports`, `covtoken fetch`). RESULTS=gate_reports make demo does that here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

RESULTS ?= results

.PHONY: install demo test test-fast bench paper samples lock clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pinned release, so no resolver picks a different build
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(BIN)/covtoken run jobs/g1_lesion_subspace.py --smoke --results $(RESULTS)
	$(BIN)/covtoken audit $(RESULTS)
	@echo
	@echo "Record and SUMMARY.md are in $(RESULTS)/. To put covtoken on your PATH in this shell:"
	@echo "    source $(VENV)/bin/activate && covtoken --help"

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the suite without the end-to-end job runs marked `slow` (a few minutes on two cores)
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

paper: install
	$(BIN)/covtoken paper build
	$(BIN)/covtoken paper verify

# G1 on the small real-data samples beside the repository (../shared/realdata). With the tiny ViT these are flow
# checks on real files (the evidence tier is derived from the facts). Every run either writes a valid record or
# stops before any backbone work with one clear line (exit 2: e.g. LIDC's 5 patients cannot give every judged
# split the locked minimum); any other failure stops make.
REALDATA ?= ../shared/realdata
SAMPLES  ?= $(RESULTS)/samples
AUDIT    ?= $(RESULTS)
SAMPLE_SETS := busi:$(REALDATA)/busi lidc:$(REALDATA)/lidc_idri
samples: install
	@for spec in $(SAMPLE_SETS); do \
	  name=$${spec%%:*}; root=$${spec#*:}; \
	  $(BIN)/covtoken run jobs/g1_lesion_subspace.py --results $(SAMPLES) -- --dataset $$name --data-root $$root; \
	  rc=$$?; \
	  if [ $$rc -eq 2 ]; then echo "samples: $$name stopped before the compute (the line above says why); no record"; \
	  elif [ $$rc -ne 0 ]; then echo "samples: $$name failed with exit code $$rc"; exit $$rc; \
	  else echo "samples: $$name wrote a record into $(SAMPLES)"; fi; \
	done
	$(BIN)/covtoken audit $(AUDIT)

# each ratio is printed with its baseline measured in the same run (other load on the machine distorts seconds)
bench: install
	$(BIN)/python tests/bench_perf.py
	$(BIN)/python tests/bench_stats.py
	$(BIN)/python tests/bench_classifier.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Pinned versions every install and every job uses (pip install -c constraints.txt ...).\n# Regenerate with: make lock' > constraints.txt

clean-venv:
	rm -rf $(VENV)
