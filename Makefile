# Thin wrapper over scripts/install: `make install`, `make uninstall`, honouring PREFIX
# (default /usr/local) and DESTDIR, e.g. `make install DESTDIR=/tmp/pkg PREFIX=/usr`.
# INSTALL_FLAGS passes options on (e.g. --no-build to install what target/release holds).
PREFIX ?= /usr/local
DESTDIR ?=
INSTALL_FLAGS ?=
export PREFIX DESTDIR

.PHONY: all install uninstall

all:
	cargo build --release -p llmsd -p llmsd-client

install:
	scripts/install $(INSTALL_FLAGS)

uninstall:
	scripts/install --uninstall $(INSTALL_FLAGS)
