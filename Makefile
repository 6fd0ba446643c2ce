# The README's two commands:  `make run` (set up, curate Fashion-MNIST-LT, train + evaluate OLTR)
# and `make test` (set up, run the test suite). Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/fmnist-lt
METHOD ?= oltr
SEED   ?= 0
RUN    ?= runs/$(METHOD)-seed$(SEED)
FMNIST  = /usr/share/datasets/fashion-mnist

.PHONY: run test setup data fashion-mnist bench bench-dev compare fig8 speed report clean
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

# The reporting protocol's fresh curations (seeds 1, 2, 3: other known/open classes and orders).
REPORTING = data/fmnist-lt-s1 data/fmnist-lt-s2 data/fmnist-lt-s3
$(REPORTING): data/fmnist-lt-s%: src/oltr/configs/fmnist_lt/protocol.yaml | setup fashion-mnist
	$(BIN)/oltr curate fashion-mnist --protocol fmnist_lt --seed $* --out $@ --force

# OLTR vs the plain model (equal epochs), OLTR's ablations and its open-set answers, on the
# reporting protocol (curations 1, 2, 3; benchmarks/README.md gives the time it took).
bench: setup $(REPORTING)
	$(BIN)/python benchmarks/fmnist_lt_oltr.py --protocol reporting

# The same on the development curation (seed 0): val figures only, where choices are made.
bench-dev: setup data
	$(BIN)/python benchmarks/fmnist_lt_oltr.py --protocol development

# Every method × every open-set detector on the reporting protocol, each method as many epochs
# as the OLTR preset; tables in runs/compare/results.md. `oltr bench --help` for the options.
compare: setup $(REPORTING)
	$(BIN)/oltr bench $(foreach d,$(REPORTING),--data $(d)) --out runs/compare --seeds 1,2,3 \
	  --epochs 30 --no-progress

# The paper's Fig. 8 (longtail-ness, open-set threshold, number of open classes), plain vs OLTR.
fig8: setup fashion-mnist
	$(BIN)/python benchmarks/fig8_analysis.py

# Training, stage-2 head, feature-cache and inference speed (and the original code's with
# ORIGINAL=path/to/OpenLongTailRecognition-OLTR).
speed: setup
	$(BIN)/python benchmarks/speed.py $(if $(ORIGINAL),--original $(ORIGINAL))

# The HTML report of the `make run` model.
report: setup
	$(BIN)/oltr report $(RUN) --data $(DATA) --out $(RUN)-report

# the layers contract (pyproject.toml's [tool.importlinter]) first, then the tests
test: setup fashion-mnist
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# removes only what oltr wrote: folders of runs/ and data/ that carry oltr's marker
clean:
	@for d in runs/* data/*; do [ -f "$$d/.oltr" ] && rm -rf "$$d" && echo "removed $$d"; done; true
