# The two set-up commands of README.md: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: deps demo test bench clean

deps:
	scripts/install-deps

demo: deps
	$(PY) -m pip install -q -e '.[demo]'
	$(PY) examples/demo.py

test: deps
	$(PY) -m pytest -q

bench: deps
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks

clean:
	rm -rf build dist *.egg-info keychain_ext/_native.* csrc/*.o
