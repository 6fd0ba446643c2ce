# The README's two commands:  `make run` (set up, curate Fashion-MNIST-LT, train + evaluate the
# plain model) and `make test` (set up, run the test suite). Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/fmnist-lt
METHOD ?= plain
SEED   ?= 0
RUN    ?= runs/$(METHOD)-seed$(SEED)
FMNIST  = /usr/share/datasets/fashion-mnist

.PHONY: run test setup data fashion-mnist bench compare fig8 clean
.DEFAULT_GOAL := run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Debian's dataset-fashion-mnist package (real Fashion-MNIST, offline); best effort: without it
# `oltr curate` tries torchvision's download and otherwise says how to get the data.
fashion-mnist:
	@test -d $(FMNIST) || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null))) || true

data: $(DATA)/manifest.json

# re-curated when the protocol changes (3 s; the same protocol gives byte-identical files)
$(DATA)/manifest.json: src/oltr/configs/fmnist_lt/protocol.yaml | setup fashion-mnist
	$(BIN)/oltr curate fashion-mnist --protocol fmnist_lt --out $(DATA) --force

run: setup data
	$(BIN)/oltr train --method $(METHOD) --data $(DATA) --out $(RUN) --seed $(SEED) --resume --no-progress
	$(BIN)/oltr evaluate $(RUN) --data $(DATA) --open --output $(RUN)/report.json

# OLTR vs plain (equal epochs) and OLTR's four ablations, 3 seeds (about 55 min on 2 CPU cores).
bench: setup data
	$(BIN)/python benchmarks/fmnist_lt_oltr.py --data $(DATA)

# Every method × every open-set detector × 3 seeds, 15 epochs per method (about 70 min on
# 2 CPU cores); tables in runs/compare/results.md. `oltr bench --help` for the matrix options.
compare: setup data
	$(BIN)/oltr bench --data $(DATA) --out runs/compare --epochs 15 --seeds 0,1,2 --no-progress

# The paper's Fig. 8 (longtail-ness, open-set threshold, number of open classes), plain vs OLTR.
fig8: setup fashion-mnist
	$(BIN)/python benchmarks/fig8_analysis.py

test: setup fashion-mnist
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs data
