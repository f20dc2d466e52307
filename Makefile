# kho-conform: set-up-and-go targets. `make check` and `make test` each set up
# everything they need on a fresh Debian machine (apt packages, a venv with the
# project, kernel sources in the cache) and then run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
KERNELS ?= 7.1 7.2 7.3
# llvm-16: llvm-profdata-16/llvm-cov-16 for --coverage; chromium: the 1280 px layout test of the HTML report.
APT_PACKAGES := clang-16 libclang-rt-16-dev llvm-16 device-tree-compiler binutils git xz-utils chromium

.PHONY: setup check test bench fuzz seeds kill-campaign clean

$(BIN)/kho-conform: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.apt-stamp:
	@if ! command -v clang-16 >/dev/null || ! dpkg -s libclang-rt-16-dev >/dev/null 2>&1 || ! command -v dtc >/dev/null || ! command -v git >/dev/null \
		|| ! command -v llvm-cov-16 >/dev/null || ! command -v chromium >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); fi
	touch $@

setup: .apt-stamp $(BIN)/kho-conform
	$(BIN)/kho-conform kernel fetch $(KERNELS)

# The main job: the conformance matrix on the default kernel (7.2), page
# shifts 12/14/16, plain and ASan+UBSan, with a short fuzz run; report in reports/.
check: setup
	$(BIN)/kho-conform check --kernel 7.2 --fuzz-time 20 --out reports

# The suite with the compiled reference model, then the model's own tests with the pure-Python one.
MODEL_TESTS := tests/test_model_*.py tests/test_fdt.py tests/test_shortcuts.py tests/test_scenarios.py \
	tests/test_compiled_model.py tests/test_corpus_replay.py
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
	KHO_CONFORM_MODEL=python $(BIN)/python -m pytest -q -n 2 --dist loadfile $(MODEL_TESTS)

bench: setup
	$(BIN)/kho-conform bench --kernel 7.2

fuzz: setup
	$(BIN)/kho-conform fuzz --kernel 7.2 --jobs 2 --time 600 fuzz-corpus

# After a decoder change: new bytes for every seed that no longer decodes to
# what its name says (fuzz/seeds.py).
seeds: $(BIN)/kho-conform
	$(BIN)/python -m fuzz.seeds

# The tool's own fault injection, longer than the test suite's one round:
# ROUNDS x 6 signals x 4 moments kills of `kho-conform fuzz`.
ROUNDS ?= 5
kill-campaign: setup
	KHO_KILL_ROUNDS=$(ROUNDS) $(BIN)/python -m pytest -q -s tests/test_tool_kills.py

clean:
	rm -rf $(VENV) .apt-stamp reports build
