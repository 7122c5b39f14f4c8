# athome-ops: `make demo` and `make test` bootstrap everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint unit check bench system-deps venv install clean ansible-test-setup sanity units

## Debian packages for the real servers the tests start on loopback (sshd,
## fail2ban, Dovecot), systemd-analyze and libseccomp's Python binding (the
## unit's hardening: its score, and ansible run under its restrictions) and the
## headless Chromium that opens every reply (with a colour emoji font, so its
## screenshots show the marks a phone shows).
## Installed only when missing and when we are root; no daemon is started by
## the install (policy-rc.d), the tests start their own.
system-deps:
	@missing=""; \
	command -v /usr/sbin/sshd >/dev/null || missing="$$missing openssh-server"; \
	command -v fail2ban-server >/dev/null || missing="$$missing fail2ban"; \
	command -v dovecot >/dev/null || missing="$$missing dovecot-imapd"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chattr >/dev/null || missing="$$missing e2fsprogs"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	/usr/bin/python3 -c 'import seccomp' 2>/dev/null || missing="$$missing python3-seccomp"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing="$$missing fonts-noto-color-emoji"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian packages:$$missing"; \
	    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "Missing system packages:$$missing (install them, or run as root)" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## `athome` on the PATH: a link to the venv's script (its shebang names the venv's Python,
## so nothing needs activating). /usr/local/bin as root, ~/.local/bin otherwise; BINDIR=... to choose.
BINDIR ?= $(if $(filter 0,$(shell id -u)),/usr/local/bin,$(HOME)/.local/bin)
install: venv
	@mkdir -p '$(BINDIR)'
	@ln -sfn '$(abspath $(BIN))/athome' '$(BINDIR)/athome'
	@echo "athome -> $(abspath $(BIN))/athome linked in $(BINDIR)"
	@case ":$$PATH:" in *":$(BINDIR):"*) ;; *) echo "$(BINDIR) is not on your PATH: add it (e.g. in ~/.profile)";; esac

demo: system-deps venv
	$(BIN)/athome demo

## ansible-test runs from the collection's own folder (it needs the
## ansible_collections/<namespace>/<name> path) on the target Pythons the fleet runs,
## 2.7 (CentOS 7 recordings host) and 3.6, and on the controller's: each passed
## explicitly, so a missing interpreter fails the run instead of being skipped.
## 2.7 and 3.6 come from pyenv (shipped on this image; `pyenv install` elsewhere),
## linked into .make/pythons so ansible-test finds python2.7/python3.6 on PATH.
## ansible-test bootstraps pip in its venvs with a get-pip.py it downloads from a
## host outside the package registries; tests/ansible_test/get_pip.py stands in for
## it (ensurepip + the registry) in ansible-test's cache.
COLLECTION := collections/ansible_collections/athome/voip
TARGET_PYTHONS := 2.7 3.6
PY_LINKS := .make/pythons
ANSIBLE_TEST_CACHE := $(HOME)/.ansible/test/cache
CONTROLLER_PYTHON = $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ANSIBLE_TEST = cd $(COLLECTION) && PATH=$(CURDIR)/$(PY_LINKS):$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/ansible-test

ansible-test-setup: venv
	@mkdir -p $(PY_LINKS) $(ANSIBLE_TEST_CACHE)
	@root=$${PYENV_ROOT:-$$HOME/.pyenv}; \
	for v in $(TARGET_PYTHONS); do \
	  py=$$(ls -d $$root/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -1); \
	  if [ -z "$$py" ] && command -v pyenv >/dev/null; then \
	    echo "Installing Python $$v with pyenv"; pyenv install -s $$v && \
	    py=$$(ls -d $$root/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -1); \
	  fi; \
	  [ -n "$$py" ] || { [ -x /usr/bin/python$$v ] && py=/usr/bin/python$$v; }; \
	  [ -n "$$py" ] || { echo "No Python $$v (pyenv install $$v): ansible-test needs it" >&2; exit 1; }; \
	  ln -sfn "$$py" $(PY_LINKS)/python$$v; \
	done
	@for v in 20_3_4 21_3_1 23_1_2; do \
	  cmp -s tests/ansible_test/get_pip.py $(ANSIBLE_TEST_CACHE)/get_pip_$$v.py || \
	    cp tests/ansible_test/get_pip.py $(ANSIBLE_TEST_CACHE)/get_pip_$$v.py; \
	done

## Every sanity test once; compile and import on each of the three Pythons.
sanity: ansible-test-setup
	$(ANSIBLE_TEST) sanity --requirements --target-python 2.7 --target-python 3.6 \
	  --target-python $(CONTROLLER_PYTHON)

## The modules' pure parts (tests/unit of the collection) on the same three, in venvs.
units: ansible-test-setup
	$(ANSIBLE_TEST) units --requirements --target-python venv/2.7 --target-python venv/3.6 \
	  --target-python venv/$(CONTROLLER_PYTHON)

lint: venv sanity
	$(BIN)/ruff check dispatcher tests bench collections
	$(BIN)/yamllint -s .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint -q playbooks collections/ansible_collections/athome/voip/roles

## The committed inventories, as CI sees them (a deployment runs
## `athome --config /etc/athome/athome.yml check`, which also checks secrets).
check: venv
	$(BIN)/athome check --inventory inventory/production
	$(BIN)/athome check --inventory inventory/demo

test: system-deps venv lint check units
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: system-deps venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .make $(COLLECTION)/tests/output
