# Everything installs itself into $(VENV): the pinned SGLang 0.5.16 stack for CPU (torch 2.11.0), sglang with
# --no-deps (its GPU-only dependencies are not needed to import it), and this package in editable mode.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): requirements/cpu-test.txt requirements/sglang.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/cpu-test.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/sglang.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m dflash_sglang demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
