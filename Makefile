# megaclass: `make demo` runs the whole pipeline locally, `make test` runs the tests.
# Both create .venv and install into it first. torch/torchvision are pinned here to the
# builds this machine serves from local disk; pyproject.toml admits any recent release.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# Allocator settings that keep JPEG decode and training from paying page faults (data_pipeline.ALLOCATOR_ENV).
export PILLOW_BLOCKS_MAX := 64
export MALLOC_MMAP_THRESHOLD_ := 67108864
export MALLOC_TRIM_THRESHOLD_ := 1073741824
export RAY_USAGE_STATS_ENABLED := 0

# The report test drives a real browser: Chromium and its driver from the OS packages.
BROWSER_PKGS := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test bench clean

install: $(VENV)/.installed

# pip's output goes to .venv/install.log and is shown only when the install fails.
PIP := $(PY) -m pip install -q --disable-pip-version-check

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing megaclass into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PIP) --upgrade pip && $(PIP) $(TORCH_PINS) && $(PIP) -e '.[dev]' $(TORCH_PINS); } \
		> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@

demo: install
	@$(VENV)/bin/megaclass simulate --workdir demo 2> demo.log || { tail -n 40 demo.log; exit 1; }
	@echo "(progress and logs: demo.log)"

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(BROWSER_PKGS); }

test: install browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo demo.log *.egg-info
