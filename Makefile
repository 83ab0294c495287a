# The two set-up commands of README.md: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: deps demo test test-darwin-double bench clean

deps:
	scripts/install-deps

demo: deps  # the test extra that deps installs holds the demo's
	$(PY) examples/demo.py

test: deps
	$(PY) -m pytest -q

# The macOS backend (csrc/keychain_darwin.c + darwin_*.c) built over the Security.framework
# test double into a throwaway copy of the package, and the public-API and
# CLI tests of tests/darwin run against it (the tree's own _native is untouched).
test-darwin-double: deps
	PY=$(PY) scripts/test-darwin-double

bench: deps
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks

clean:
	rm -rf build dist *.egg-info keychain_ext/_native.* csrc/*.o
