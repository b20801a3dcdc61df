# Two entry points: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second environment with the oldest napari pyproject.toml allows (pinned in
# constraints-oldest.txt); `make test` runs the GUI tests in it too.
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_PINS := constraints-oldest.txt
# The GUI tests: every test that starts napari, opens a viewer or reads the plugin manifest.
GUI_TESTS := tests/test_widget.py tests/test_widget_sections.py tests/test_widget_stacks.py \
  tests/test_widget_concept.py tests/test_widget_history_save.py tests/test_cold_start.py \
  tests/test_widget_clicks.py tests/test_labels_pyramid.py tests/test_view_lazy.py \
  tests/test_manifest.py tests/test_distributed_widget.py tests/test_ngff.py::test_napari_ome_zarr_reads_labels_aligned \
  tests/test_widget_provenance.py tests/test_widget_session.py \
  tests/test_cli.py::test_view_bad_image_is_one_line \
  tests/test_cli.py::test_view_screenshot
DEMO_MODEL ?= facebook/sam3
XVFB := xvfb-run -a -s "-screen 0 1920x1080x24"
export QT_QPA_PLATFORM ?= xcb
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-oldest lint bench system-deps clean

# torch and torchvision, installed once into $(TORCH_DIR) and shared by both venvs
# through a .pth file: the pair is 5.5 GB (mostly CUDA libraries), too much to
# install twice on a small disk. transformers' SAM3 image processor needs
# torchvision; this pair is the one that installs together here (see README,
# "Installing"). pip in each venv sees them as installed and adds the rest.
# The stamp names the pair, so changing it here installs the new pair. pip is the venv's
# (a system Python may have venv but no pip).
TORCH_DIR := .torch
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
TORCH_STAMP := $(TORCH_DIR)/.installed-$(subst ==,-,$(subst $() ,_,$(TORCH_PAIR)))
$(TORCH_STAMP):
	rm -rf $(TORCH_DIR)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --target $(TORCH_DIR) $(TORCH_PAIR)
	touch $@

# $(call make-venv,DIR,EXTRA PIP ARGS): a venv that sees $(TORCH_DIR), with the package.
define make-venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], '_napari_sam3_torch.pth').write_text(str(pathlib.Path('$(TORCH_DIR)').resolve()) + '\n')"
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -e ".[test]" $(2)
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(call make-venv,$(VENV))

$(OLDEST_STAMP): pyproject.toml $(OLDEST_PINS) $(TORCH_STAMP)
	$(call make-venv,$(OLDEST_VENV),-c $(OLDEST_PINS))

# Xvfb and the X/GL libraries Qt needs (Debian); only when missing.
system-deps:
	@if ! command -v xvfb-run >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglib2.0-0 libfontconfig1 fonts-dejavu-core libdbus-1-3 \
	    libxkbcommon0 libxkbcommon-x11-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 \
	    libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 >/dev/null; \
	fi

demo: $(STAMP)
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
	  $(VENV)/bin/napari-sam3 view --sample; \
	else \
	  echo "No display found: running the demo under Xvfb (Load model, one click on a cell) and saving a screenshot to demo.png"; \
	  $(MAKE) --no-print-directory system-deps; \
	  model=$$($(PY) -m napari_sam3.testing demo-model .demo-model $(DEMO_MODEL)) && \
	  $(XVFB) $(VENV)/bin/napari-sam3 view --sample --model "$$model" --click 250,380 --screenshot demo.png; \
	fi

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check src tests benchmarks
	mkdir -p -m 0700 /tmp/runtime-$$(id -u)
	XDG_RUNTIME_DIR=/tmp/runtime-$$(id -u) $(XVFB) $(PY) -m pytest -q
	$(MAKE) --no-print-directory test-oldest

# The GUI tests again, against the oldest napari allowed.
test-oldest: $(OLDEST_STAMP) system-deps
	@$(OLDEST_PY) -c "import napari; print('GUI tests with napari', napari.__version__)"
	mkdir -p -m 0700 /tmp/runtime-$$(id -u)
	XDG_RUNTIME_DIR=/tmp/runtime-$$(id -u) $(XVFB) $(OLDEST_PY) -m pytest -q $(GUI_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_click.py
	$(PY) benchmarks/bench_import.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(TORCH_DIR) .demo-model build *.egg-info src/*.egg-info .pytest_cache
