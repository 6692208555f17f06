# The two commands of the quick start: `make run` and `make test`.
# Each bootstraps .venv by itself when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench profile clean system-deps fuzz chaos shapes

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hydra-trio up --submit examples/graph.toml

lint: $(STAMP)
	$(BIN)/ruff check hydra_trio tests benchmarks

# The builder runs on Linux and macOS: both platforms' type stubs must accept the code, so a
# Linux-only call (os.copy_file_range, socket.SOCK_CLOEXEC) cannot slip in unguarded.
typecheck: $(STAMP)
	$(BIN)/mypy --strict --platform linux hydra_trio
	$(BIN)/mypy --strict --platform darwin hydra_trio
	$(BIN)/mypy --platform linux tests

system-deps:
	@scripts/system-deps.sh

unit: $(STAMP) system-deps
	$(BIN)/pytest -q

test: lint typecheck unit

# The runner's connection handler under 100,000 hostile peers (docs/security.md); about 35
# minutes on one idle core.  `make test` runs the same test with 200.  No faulthandler dump:
# the one test legitimately runs for a long time.
fuzz: $(STAMP)
	HYDRA_TRIO_FUZZ_EXAMPLES=100000 $(BIN)/pytest -q -o faulthandler_timeout=0 tests/test_fuzz.py

# The level-2 reliability suite (docs/reliability.md): real daemons, each builder in its own
# network namespace, faults from the kernel (iptables, tc, ip link) and signals; about 17
# minutes.  Needs root; where namespaces are not permitted it falls back to a fault-injecting
# proxy and says so.  HYDRA_TRIO_CHAOS_NET=netns|proxy forces one.
chaos: $(STAMP) system-deps
	HYDRA_TRIO_CHAOS=1 $(BIN)/pytest -q -o faulthandler_timeout=900 tests/chaos

# Builds of real shapes with real daemons (issue 18): 3 dependencies x 30,000 files beside an
# innocent build, and 100,000 output files, at a 1 s ping and 3 s timeouts; minutes, not seconds.
shapes: $(STAMP)
	HYDRA_TRIO_SHAPES=1 $(BIN)/pytest -q -s -o faulthandler_timeout=900 tests/test_shapes_real.py

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/run_all.py

# Flame graphs (py-spy) of the benchmarks' processes at smoke sizes, into docs/profiles/
# (benchmarks/profile_all.py; about 5 minutes; not part of make test).
profile: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/profile_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
