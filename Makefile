# make quickstart   — install (first time) and run the main job end to end on real ML-100K
# make test         — install (first time) and run the test suite
# DEVICE=cuda make ... installs the CUDA variant (default: cpu).
DEVICE ?= cpu
VENV := .venv

.PHONY: install quickstart test clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	scripts/install.sh $(DEVICE)

quickstart: install
	$(VENV)/bin/hybrid quickstart --out runs/quickstart

test: install
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs
