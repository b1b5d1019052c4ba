# Thin wrappers; the scripts do the work (see README.md, "Operating mars").

PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: install man

# Release build, then binaries, systemd units, man pages, completions.
install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" scripts/install.sh

# man/marsadm.1 and man/marsd.8 from the clap definitions.
man:
	scripts/gen-man.sh
