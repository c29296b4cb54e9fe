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

# Two pytest workers, one thread each (two 2-thread processes on 2 cores oversubscribe OpenMP),
# one test file per worker at a time; then the tests that need the machine's memory to themselves.
test: setup-test
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -m "not whole_machine"
	$(PY) -m pytest -m whole_machine
