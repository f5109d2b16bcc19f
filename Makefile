# The one place every command lives; CI (.ci/run) and the README call these targets.
# `make help` lists them from the `##` comments.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN := .run
PIDFILE := $(RUN)/honcho.pid
API_URL := http://127.0.0.1:8080
PYTEST_ARGS ?=

# A Docker engine with the compose plugin -> containers; otherwise local processes
# against the services on loopback.
DOCKER_OK = docker compose version >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1

.PHONY: help install up down migrate test test-fast faults lint logs clean bench

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes (or the venv is new).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install the package with its dev tools
	@:

migrate: install ## create the database if missing and upgrade it to head
	$(BIN)/python -m services.core.migrate

# Where the tests' MySQL, RabbitMQ and Redis come from is decided in one place,
# tests/services.py (TEST_*_URL, else testcontainers, else loopback); .ci/run pins the URLs.
test: install ## run every test (unit, integration, e2e)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install ## run the tests not marked slow
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The fault suite at larger sizes (FAULT_SCALE multiplies the email counts and outage
# lengths); one ledger row per scenario at the end, and in .run/faults-ledger.jsonl.
FAULT_SCALE ?= 5
faults: install ## the fault-injection suite at larger sizes, printing the delivery ledger
	@mkdir -p $(RUN) && rm -f $(RUN)/faults-ledger.jsonl
	FAULT_SCALE=$(FAULT_SCALE) $(BIN)/pytest tests/faults -p no:cacheprovider --timeout 1800 $(PYTEST_ARGS)

# Real services on loopback (BENCH_DATABASE_URL / BENCH_RABBITMQ_URL / BENCH_REDIS_URL
# override them); its own database and queues, removed afterwards. BENCH_ARGS=--quick
# for a short smoke run. Table on stdout, figures in bench/results/<UTC time>.json.
BENCH_ARGS ?=
bench: install ## measure the pipeline against this machine's limits and Celery (12-17 min)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install ## ruff (lint + format check), mypy, import contracts; reports all four
	@status=0
	$(BIN)/ruff check . || status=1
	$(BIN)/ruff format --check . || status=1
	$(BIN)/mypy || status=1
	$(BIN)/lint-imports || status=1
	exit $$status

# .env supplies API_KEYS and MAIL_FROM to both the local processes and compose (the API
# refuses a sender without a dotted domain, hence example.com);
# created once with a fresh key, never overwritten.
.env: | $(STAMP)
	@key="dev-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(16))')"
	printf 'API_KEYS=%s\nMAIL_FROM=scheduler@example.com\n' "$$key" > $@
	echo "created .env with a new API key"

up: install .env ## start the stack (docker compose if an engine answers, else local processes)
	@if [ -f $(PIDFILE) ] && kill -0 "$$(cat $(PIDFILE))" 2>/dev/null; then
		echo "local stack already running (honcho pid $$(cat $(PIDFILE))); 'make down' stops it"
		mail="$(RUN)/mail/new"
	elif $(DOCKER_OK); then
		docker compose up --build -d --wait
		echo "mail UI:   http://127.0.0.1:8025 (mailpit)"
		mail="the mailpit UI"
	else
		mkdir -p $(RUN)
		$(BIN)/python -m services.core.migrate
		PATH="$(CURDIR)/$(BIN):$$PATH" setsid $(BIN)/honcho start -f Procfile.dev \
			> $(RUN)/stack.log 2>&1 < /dev/null &
		echo $$! > $(PIDFILE)
		for _ in $$(seq 60); do
			curl -fsS -o /dev/null $(API_URL)/healthz 2>/dev/null && break
			if ! kill -0 "$$(cat $(PIDFILE))" 2>/dev/null; then break; fi
			sleep 0.5
		done
		if ! curl -fsS -o /dev/null $(API_URL)/healthz 2>/dev/null; then
			echo "the API did not answer $(API_URL)/healthz within 30 s; last lines of $(RUN)/stack.log:" >&2
			tail -n 30 $(RUN)/stack.log >&2
			$(MAKE) down >&2
			exit 1
		fi
		echo "local stack started (honcho pid $$(cat $(PIDFILE))); logs: make logs"
		mail="$(RUN)/mail/new (one file per message, Maildir)"
	fi
	key="$$(sed -n 's/^API_KEYS=//p' .env | tail -n 1 | cut -d, -f1 | tr -d "\"'")"
	# (echo, not a heredoc: make strips leading blanks and dashes from every recipe line)
	echo "API:       $(API_URL)   (docs: $(API_URL)/docs)"
	echo "API key:   $$key"
	echo "mail goes: $$mail"
	echo
	echo "schedule an email 10 s from now:"
	echo "  curl -sS -X POST $(API_URL)/v1/emails \\"
	echo "    -H 'Authorization: Bearer $$key' -H 'Content-Type: application/json' \\"
	echo "    -d '{\"to\": [\"someone@example.com\"], \"subject\": \"Hello\", \"text\": \"Sent by emailsched\", \"send_at\": \"'\"\$$(date -u -d '+10 seconds' +%Y-%m-%dT%H:%M:%SZ)\"'\"}'"

down: ## stop the stack started by `make up`
	@if [ -f $(PIDFILE) ]; then
		pid="$$(cat $(PIDFILE))"
		if kill "$$pid" 2>/dev/null; then
			# honcho passes SIGTERM on and waits for its processes to finish
			for _ in $$(seq 60); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.5; done
			if kill -0 "$$pid" 2>/dev/null; then
				echo "honcho (pid $$pid) still running after 30 s" >&2
				exit 1
			fi
		fi
		rm -f $(PIDFILE)
		echo "local stack stopped"
	elif $(DOCKER_OK); then
		docker compose down
	else
		echo "nothing running"
	fi

logs: ## follow the stack's logs
	@if [ -f $(PIDFILE) ]; then
		tail -n 100 -F $(RUN)/stack.log
	elif $(DOCKER_OK); then
		docker compose logs -f
	else
		echo "nothing running; 'make up' starts the stack" >&2
	fi

clean: ## remove caches and build output (keeps .venv, .env and a running stack's files)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .import_linter_cache build dist *.egg-info $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	if [ ! -f $(PIDFILE) ]; then rm -rf $(RUN); fi
