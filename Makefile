# raycp — the two commands: `make demo` and `make test`. Both set everything up themselves.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.raycp-installed
export RAYCP_SHARED_DATA ?= $(abspath ../shared/data)
RUN      ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all bench lock clean

$(STAMP): pyproject.toml requirements/lock.txt
	@echo "== installing raycp into $(VENV) (pinned CPU lock; ~5 min the first time)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default: a local Ray cluster, local files, the real data.
demo: setup
	$(BIN)/raycp index build "$(RAYCP_SHARED_DATA)/images/pediatric_5ch_BR00143976_C03_s3/images/orig" \
	    --from phenix --plate BR00143976 --channel-map 5=DNA,2=ER,6=RNA,3=AGP,4=Mito \
	    --output $(RUN)/index/sites.parquet
	$(BIN)/raycp index summarize --config configs/demo.yaml --set data.output=$(RUN) --set data.index=$(RUN)/index/sites.parquet

## The default test tier (CI): < ~20 min on 2 cores.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The slow tier: end-to-end runs.
test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

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
	rm -rf $(VENV) runs .pytest_cache
