# One task runner for the habits in shared/style.md. `make test` is what CI runs.
PY ?= python

.PHONY: test lint bench docs

test:
	$(PY) -m pip install -q -e '.[test]' && $(PY) -m pytest -q

lint:
	$(PY) -m ruff check weco_observe tests benchmarks examples setup.py _weco_observe_alias.py
	$(PY) -m ruff format --check weco_observe tests benchmarks examples setup.py _weco_observe_alias.py

bench:
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

docs:
	$(PY) tests/cli_reference.py --write
