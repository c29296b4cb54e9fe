# The README's two commands. Both create .venv on first use (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup setup-test train test

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

# The main job: pretrain a tiny MAC model on the built-in corpus (CPU, no downloads).
train: setup
	.venv/bin/titans-train train tiny-mac-cpu

test: setup-test
	$(PY) -m pytest
