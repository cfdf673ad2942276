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

# G1 on the small real-data samples beside the repository (../shared/realdata). With the tiny ViT these are flow
# checks on real files (the evidence tier is derived from the facts). Every run either writes a valid record or
# stops before any backbone work with one clear line (exit 2: e.g. LIDC's 5 patients cannot give every judged
# split the locked minimum); any other failure stops make.
REALDATA ?= ../shared/realdata
SAMPLES  ?= gate_reports/samples
AUDIT    ?= gate_reports
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

bench: install
	$(BIN)/python tests/bench_stats.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Pinned versions every install and every job uses (pip install -c constraints.txt ...).\n# Regenerate with: make lock' > constraints.txt

clean-venv:
	rm -rf $(VENV)
