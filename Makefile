# xenbed — every entry point a person or CI needs.  `make` alone prints help.
#
# Each target brings up what it needs and nothing more: the engine (installed
# and started if absent), the host venv (rebuilt only when pyproject.toml
# changes), the images (incremental: about a second when nothing changed).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON  ?= python3
VENV    := .venv
XENBED  := $(VENV)/bin/xenbed
PYTEST  := $(VENV)/bin/python -m pytest -p no:cacheprovider
STAMP   := $(VENV)/.installed
SERVICE ?=
# Extra pytest arguments, e.g. make test ARGS='-k blk -x'
ARGS    ?=

IMAGES := xenbed/hypervisor:latest xenbed/dom0:latest xenbed/domu:latest \
          xenbed/peer:latest xenbed/domain:bookworm xenbed/base:bookworm

# Per-machine random domain credentials, so nothing can authenticate with a
# value it read in this repository (the compose files have no defaults: a
# credential unset is an error).  They live in .env beside COMPOSE_FILE, which
# docker-compose reads from the repository root, so after `make up` a plain
# `docker-compose exec ...` there works; stable across make runs (up, test and
# down must agree); not in git.
ENVFILE := .env
-include $(ENVFILE)
export XENBED_CRED_DOM0 XENBED_CRED_DOMU1 XENBED_CRED_DOMU2

.PHONY: help up down status logs test unit bench chaos images docker tools venv clean distclean

help: ## show this help
	@echo "xenbed: Xen's PV split drivers on Docker, no Xen.  Targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: SERVICE=<name> for logs, ARGS='<pytest args>' for test/unit/chaos, V=1 for full build output."

up: docker venv images ## start the default testbed (compose/testbed.yml) and wait until healthy
	$(XENBED) up

down: venv ## stop the testbed and remove its containers, volumes and network
	$(XENBED) down

status: venv ## show domains, containers and their health
	$(XENBED) status

logs: venv ## show logs (all services, or SERVICE=dom0)
	$(XENBED) logs $(SERVICE)

# pytest exit 5 = nothing collected: say so loudly but do not fail the build on
# it (a suite being written should not block merges; CI notices "no tests").
test: docker venv tools images ## run every test (unit, integration, chaos, security); JUnit in out/junit.xml
	@mkdir -p out
	@rc=0; $(PYTEST) tests -q -m "not soak" --junitxml=out/junit.xml $(ARGS) || rc=$$?; \
	 if [ $$rc -eq 5 ]; then echo "make test: NO TESTS COLLECTED"; rc=0; fi; exit $$rc

unit: venv tools ## run the unit tests only (no Docker needed, seconds)
	$(PYTEST) tests/unit -q $(ARGS)

chaos: docker venv images ## chaos tests + the random fault schedule (XENBED_CHAOS_ROUNDS=30, XENBED_CHAOS_SEED=...)
	@mkdir -p out
	$(PYTEST) tests -q -s -m chaos --junitxml=out/junit-chaos.xml $(ARGS)

bench: docker venv images ## run the benchmarks (block and network throughput, latencies)
	$(XENBED) bench

images: docker ## build the container images (incremental; first time ~90 s)
	images/build.sh

tools: ## make sure gcc and Xen's headers (libxen-dev) are there for the ABI check
	@scripts/ensure-host-tools.sh

docker: ## make sure a Docker engine runs and a compose exists (installs/starts them)
	@scripts/ensure-docker.sh

venv: $(STAMP) ## create .venv with the host-side dependencies

$(STAMP): pyproject.toml scripts/ensure-venv.sh
	PYTHON=$(PYTHON) scripts/ensure-venv.sh $(VENV)
	@touch $@

$(ENVFILE):
	@{ echo "# written by make: the default topology and fresh domain credentials (not in git)"; \
	   echo "COMPOSE_FILE=compose/testbed.yml"; echo "COMPOSE_PROJECT_NAME=xenbed"; \
	   for d in DOM0 DOMU1 DOMU2; do \
	     echo "XENBED_CRED_$$d=$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; \
	   done; } > $@

# Containers using the images must go first or `docker rmi` refuses.  Only our
# own image names are removed (others share this engine), plus the untagged
# older builds carrying our label, which otherwise keep every layer alive as
# build cache.  The debootstrap root
# (xenbed/rootfs) stays, it is the slow part: see distclean.
clean: ## remove out/, .venv and the xenbed images (keeps the debootstrap root)
	@if docker info >/dev/null 2>&1; then \
	   $$(scripts/ensure-docker.sh --print-compose) down -v --remove-orphans >/dev/null 2>&1 || true; \
	   for i in $(IMAGES); do docker image inspect $$i >/dev/null 2>&1 && docker rmi $$i >/dev/null && echo "removed $$i"; done; \
	   docker image prune -f --filter label=org.xenbed.image >/dev/null; true; \
	 fi
	rm -rf out $(VENV) build *.egg-info

distclean: clean ## clean, and also remove the debootstrap root image (next build redoes it)
	@docker image inspect xenbed/rootfs:bookworm >/dev/null 2>&1 && docker rmi xenbed/rootfs:bookworm || true
