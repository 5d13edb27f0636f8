# The two commands: `make demo` and `make test`. Everything they need is installed by them.
SHELL := /usr/bin/env bash
CARGO ?= cargo
NATS_SERVER = $(shell scripts/nats-server.sh)

.PHONY: demo test nats-server fmt lint ci bench

nats-server:
	@scripts/nats-server.sh

demo:
	@nats="$$(scripts/nats-server.sh)" && \
	$(CARGO) build --release -p wangge && \
	WANGGE_NATS_SERVER="$$nats" target/release/wangge demo

test:
	@nats="$$(scripts/nats-server.sh)" && export WANGGE_NATS_SERVER="$$nats" && \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast --profile ci; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi && $(CARGO) test --workspace --doc

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

ci: lint test
