# athome-ops: `make demo` and `make test` bootstrap everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint unit check bench system-deps venv install clean ansible-test-setup sanity units \
	latest-core-venv test-latest-core

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

## The newest ansible-core the controller's Python supports (2.19 for Python 3.11; 2.20
## needs 3.12), in its own venv: 2.16 stays the pinned default in .venv, as the last
## release that drives the fleet's 2.7/3.6 hosts. The project's own dependencies are
## installed first, then ansible-core is moved up over its pin (pip warns about the pin;
## nothing here runs the pinned parts that care). Python 3 targets only.
LATEST_VENV ?= .venv-latest
LATEST_BIN := $(LATEST_VENV)/bin
LATEST_CORE ?= ansible-core>=2.19,<2.20
LATEST_STAMP := $(LATEST_VENV)/.installed
LATEST_PYTHON_VERSION = $(shell $(LATEST_BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
## A representative set of playbook tests rather than all of them (the whole suite again
## would double make test; with the units, 4 min 41 s here on 2 loaded cores): per playbook
## its main path with check mode, apply and again, one failure path, and each module and
## route once (MACCHANGE with the probe and another file layout and a failed second write;
## CHECKIP unban and a refused address; RAMAIS local, S3 and the one-minute window); the
## tarball built, installed and read by ansible-doc outside the repository. Left out: what
## needs Python 2.7/3.6 targets (2.17 dropped them) and variations of the same paths.
LATEST_TESTS ?= \
	'tests/test_macchange_playbook.py::test_three_legacy_runs_in_sequence' \
	'tests/test_macchange_playbook.py::test_refused_change_writes_nothing[mac-mismatch]' \
	'tests/test_macchange_playbook.py::test_apply_and_failed_second_write_on_target_python[3]' \
	'tests/test_macchange_playbook.py::test_probe_reports_how_every_layout_parses_and_changes_nothing' \
	'tests/test_macchange_playbook.py::test_a_change_on_another_layout_writes_only_the_mac[section]' \
	'tests/test_checkip_playbooks.py::test_unban_unbans_where_banned_and_whitelists_everywhere' \
	'tests/test_checkip_playbooks.py::test_invalid_address_fails_before_any_host[0.0.0.0/0]' \
	'tests/test_recordings_playbook.py::test_audio_route_year_end_publishes_the_exact_selection' \
	'tests/test_recordings_playbook.py::test_a_one_minute_window_selects_that_minute' \
	'tests/test_recordings_playbook.py::test_routing_flips_by_inventory_and_s3_route_serves_a_presigned_zip' \
	tests/test_collection.py
LATEST_ANSIBLE_TEST = cd $(COLLECTION) && PATH=$(CURDIR)/$(LATEST_BIN):$$PATH $(CURDIR)/$(LATEST_BIN)/ansible-test

$(LATEST_STAMP): pyproject.toml
	test -x $(LATEST_BIN)/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/pip install -q --upgrade pip
	$(LATEST_BIN)/pip install -q -e '.[dev]'
	$(LATEST_BIN)/pip install -q '$(LATEST_CORE)'
	touch $(LATEST_STAMP)

latest-core-venv: $(LATEST_STAMP)

test-latest-core: system-deps latest-core-venv
	$(LATEST_BIN)/python -c 'from ansible.release import __version__; print("ansible-core", __version__)'
	$(LATEST_ANSIBLE_TEST) units --requirements --python $(LATEST_PYTHON_VERSION)
	PATH=$(CURDIR)/$(LATEST_BIN):$$PATH $(LATEST_BIN)/python -m pytest -p no:cacheprovider \
	  $(LATEST_TESTS) $(PYTEST_ARGS)

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
	$(MAKE) test-latest-core

bench: system-deps venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(LATEST_VENV) .demo .pytest_cache .ruff_cache .make $(COLLECTION)/tests/output
