# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
.PHONY: setup demo test lint bench

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/nseh demo

test: setup
	.venv/bin/ruff check src tests
	.venv/bin/pytest -ra

lint: setup
	.venv/bin/ruff check src tests
