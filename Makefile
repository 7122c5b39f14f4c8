# athome-ops: `make demo` and `make test` bootstrap everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint unit check bench system-deps venv install clean

## Debian packages for the real servers the tests start on loopback (sshd,
## fail2ban, Dovecot) and the headless Chromium that opens every reply
## (with a colour emoji font, so its screenshots show the marks a phone shows).
## Installed only when missing and when we are root; no daemon is started by
## the install (policy-rc.d), the tests start their own.
system-deps:
	@missing=""; \
	command -v /usr/sbin/sshd >/dev/null || missing="$$missing openssh-server"; \
	command -v fail2ban-server >/dev/null || missing="$$missing fail2ban"; \
	command -v dovecot >/dev/null || missing="$$missing dovecot-imapd"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chattr >/dev/null || missing="$$missing e2fsprogs"; \
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

lint: venv
	$(BIN)/ruff check dispatcher tests bench roles
	$(BIN)/yamllint -s .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint -q playbooks roles

## The committed inventories, as CI sees them (a deployment runs
## `athome --config /etc/athome/athome.yml check`, which also checks secrets).
check: venv
	$(BIN)/athome check --inventory inventory/production
	$(BIN)/athome check --inventory inventory/demo

test: system-deps venv lint check
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: system-deps venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
