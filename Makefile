# celery-fleet: every entry point a developer or CI uses.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
BIN       := $(VENV)/bin
PY        := $(BIN)/python
LAB       := $(BIN)/lab
VENV_STAMP := $(VENV)/.venv-stamp
DEBS_STAMP := $(VENV)/.debs-stamp
DEB_PKGS  := debootstrap systemd-container iproute2 apt-cacher-ng openssh-client redis-server nftables curl \
             chromium chromium-driver libnss3-tools
TUTORIAL_URLS := $(foreach i,1 2 3 4 5,http://198.18.0.1:8080/tutorial/$(i))
PACKAGES  := lab app runtime cli tests/support
VENV_INPUTS := ansible/requirements.in ansible/constraints.txt $(addsuffix /pyproject.toml,$(PACKAGES))

.PHONY: help venv setup demo test faults ha lint lab-up lab-down bench bench-app deploy clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## The pinned control-node venv (.venv): Ansible, the lab, the app, test tools; no root

setup: venv $(DEBS_STAMP) ## venv, plus the Debian packages the lab and the browser tests need (root)

$(VENV_STAMP): $(VENV_INPUTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -c ansible/constraints.txt -r ansible/requirements.in
	$(BIN)/pip install -q -c ansible/constraints.txt $(addprefix -e ,$(PACKAGES))
	@touch $@

$(DEBS_STAMP): $(VENV_STAMP)
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

demo: setup ## The main job: lab up, deploy site.yml, the tutorial's fan-out from client1, screenshots
	$(LAB) up
	$(BIN)/ansible-playbook site.yml
	@echo "==> The tutorial's five URLs from client1: sequentially, then fanned out over the workers"
	$(LAB) ssh client1 -- fleetapp fetch --compare $(TUTORIAL_URLS)
	@$(BIN)/ansible-playbook playbooks/summary.yml | sed -n '/msg:/,/^$$/p'
	@echo "==> Flower and Prometheus as a browser shows them (headless Chromium)"
	$(BIN)/fleet screenshots

test: setup ## Every test: lint, app tests, lab and deployment tests on a fresh lab (torn down after)
	bash tests/run.sh

faults: setup ## The fault suite at full size on the lab (deploys; the lab stays up); prints the ledger table
	$(LAB) up
	FLEET_FAULTS_SIZE=full PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest -p no:cacheprovider tests/fleet/faults

ha: setup ## The Sentinel suite on a fresh lab (it replaces the lab; leaves it on three Redis hosts); FLEET_REDIS_SERVER=valkey: on Valkey
	$(LAB) down
	$(LAB) up
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest -p no:cacheprovider tests/sentinel

lint: venv ## ansible-lint (production profile), yamllint, ruff, mypy --strict
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) tests/lint/check_role_specs.py

lab-up: setup ## Bring the lab up (default topology)
	$(LAB) up

lab-down: setup ## Remove every lab machine, namespace, bridge and mirror
	$(LAB) down

deploy: setup ## ansible-playbook site.yml against the default inventory
	$(BIN)/ansible-playbook site.yml

bench: setup ## The fleet against the tutorial's deployment on the lab: tables, JSON and a chart in .build/bench
	$(LAB) up
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) bench/run.py

bench-app: setup ## 20 slow URLs: sequential vs distributed over a local Redis and gevent workers
	$(PY) app/bench/bench_fanout.py

clean: lab-down ## Remove the lab and the venv (caches stay)
	rm -rf $(VENV)
