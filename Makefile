# Kiln's two entry points: `make deploy` and `make test`. Both install what is missing first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kiln-installed
APT_PACKAGES := gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user openssh-server socat iproute2 g++ chromium ser2net espeak-ng

.PHONY: deploy test setup system-packages list clean

deploy: setup
	$(VENV)/bin/doit deploy:traffic_signs

test: setup
	$(PY) -m pytest -q --durations=25 tests

list: setup
	$(VENV)/bin/doit list

setup: system-packages $(STAMP)

# Debian packages: installed with apt-get when running as root, else we say what is missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "kiln: installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "kiln: missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "kiln: $(PYTHON) not found (Kiln needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@# pyserial and labgrid's pyserial-labgrid install the same `serial` module: keep the fork alone
	@if $(PY) -m pip show -q pyserial >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -y -q pyserial && $(PY) -m pip install -q --force-reinstall --no-deps pyserial-labgrid==3.5.0.2; fi
	touch $@

clean:
	rm -rf build
