# lambda: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/lambda-target
CARGO ?= cargo
DEMO_DIR ?= data/demo
DEMO_EVENTS ?= 2000000

.PHONY: demo test fmt lint unit bench gen build help emulators-up emulators-down

help: ## Show the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: ## The main job end to end on the embedded default (no services needed).
	bash scripts/demo.sh "$(DEMO_DIR)" "$(DEMO_EVENTS)"

test: ## Every check: fmt, clippy -D warnings, infra lint/scan, all tests with the AWS emulators.
	bash scripts/test.sh

emulators-up: ## Start DynamoDB Local, kinesis-mock and moto (S3) on 127.0.0.1; prints their endpoints.
	bash scripts/emulators.sh up

emulators-down: ## Stop the emulators started by emulators-up.
	bash scripts/emulators.sh down

fmt: ## cargo fmt --check
	$(CARGO) fmt --all -- --check

lint: ## clippy on every target, warnings denied
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## All tests of the workspace.
	$(CARGO) test --workspace --locked

bench: ## Criterion benchmarks on one core: decode + aggregate, a batch row's features and encoding, and the speed path.
	$(CARGO) bench -p lambda-core --bench decode_aggregate
	$(CARGO) bench -p lambda-core --bench row_features
	$(CARGO) bench -p lambda-speed --bench tiler

build: ## Release binaries.
	$(CARGO) build --release --locked --bins

gen: ## Generate 10 million events (about 90 days) into data/gen10m.
	$(CARGO) run --release --locked -p lambda-gen -- --events 10000000 --days 90 --out data/gen10m
