# Thin wrapper over scripts/install: `make install`, `make uninstall`, honouring PREFIX
# (default /usr/local) and DESTDIR, e.g. `make install DESTDIR=/tmp/pkg PREFIX=/usr`.
PREFIX ?= /usr/local
DESTDIR ?=
export PREFIX DESTDIR

.PHONY: all install uninstall

all:
	cargo build --release -p llmsd -p llmsd-client

install:
	scripts/install

uninstall:
	scripts/install --uninstall
