# Every target creates or reuses .venv by itself: `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes whenever pyproject.toml does, so a dependency change reinstalls.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv ls-venv demo test e2e lint format audit bench bench-db bench-interactive clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,sam,clip]'
	$(BIN)/pip install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-deps --no-build-isolation sam2==1.1.0
	# open_clip like sam2: pinned, --no-deps (its pure-Python deps come with the 'clip' extra).
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0
	# pip check must be clean except for the torchvision declarations of sam2 and open_clip (served by
	# seemly/engines/torchvision_compat.py) and open_clip's timm (not installed: timm needs the real
	# torchvision; open_clip imports it optionally).
	@out="$$($(BIN)/pip check 2>&1)"; rest="$$(printf '%s\n' "$$out" | grep -v -e '^sam2 1\.1\.0 requires torchvision, which is not installed\.$$' -e '^open-clip-torch 3\.3\.0 requires torchvision, which is not installed\.$$' -e '^open-clip-torch 3\.3\.0 requires timm, which is not installed\.$$' -e '^No broken requirements found\.$$' || true)"; if [ -n "$$rest" ]; then printf '%s\n' "$$rest"; exit 1; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# Label Studio's own pins clash with ours, so the real server used by the e2e tests lives in .venv-ls.
LS_VENV := .venv-ls
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-label-studio-$(LS_VERSION)

ls-venv: $(LS_STAMP)  ## Label Studio $(LS_VERSION) in its own virtualenv (for tests/fixtures/label_studio.py)

$(LS_STAMP):
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==$(LS_VERSION)
	@rm -f $(LS_VENV)/.installed-*
	@touch $@

demo: venv  ## segment the bundled sample images with the embedded defaults
	$(BIN)/seemly demo

test: venv ls-venv  ## the whole test suite (needs PostgreSQL at 127.0.0.1:5432; .ci/run starts it)
	$(BIN)/python -m pytest

e2e: venv ls-venv  ## only the end-to-end tests against a real Label Studio server
	$(BIN)/python -m pytest -m e2e

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pip-audit of every installed distribution (local version labels such as torch's +cpu stripped: the
# advisories name the public version). --strict fails on any distribution it could not audit, so a run
# without a reachable vulnerability service fails instead of looking green. AUDIT_SERVICE=osv|pypi.
AUDIT_SERVICE ?= pypi
audit: venv  ## known vulnerabilities in the venv (tests/test_dependency_audit.py runs the same in CI)
	$(BIN)/pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' > $(VENV)/audit-requirements.txt
	$(BIN)/pip-audit --strict --no-deps --disable-pip --progress-spinner off -s $(AUDIT_SERVICE) \
		-r $(VENV)/audit-requirements.txt

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-db: venv
	$(BIN)/python benchmarks/db_write.py

bench-interactive: venv
	$(BIN)/seemly bench interactive --markdown docs/_interactive.md

bench: bench-db bench-interactive

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
