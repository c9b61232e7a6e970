# cloudprotect — see README.md. `make run` starts the product, `make test` tests it.

GO       ?= go
BIN      := bin
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X github.com/cloudprotect/cloudprotect/cmd/internal/version.Version=$(VERSION)
COMMANDS := cloudprotectd cloudprotect cloudprotect-tray cloudprotect-server
PREFIX   ?= /usr/local
FUZZTIME ?= 10s

.PHONY: all build test bench lint run install fuzz icons clean faults soak console-shots

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./cmd/,$(COMMANDS))

# vet, then every test with the race detector. Tests that need root, a
# D-Bus session bus or PostgreSQL skip with a message on a laptop and fail
# under CI=true (see .ci/run, which provides them).
test:
	$(GO) vet ./...
	$(GO) test -race -timeout 25m ./...

# Benchmarks, compared side by side in one run; figures go to docs/BENCHMARKS.md.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -timeout 30m ./...

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	@if command -v staticcheck >/dev/null; then staticcheck ./...; else echo "staticcheck not installed: go install honnef.co/go/tools/cmd/staticcheck@latest"; fi

# The agent (user mode), the local reference cloud and, in a desktop
# session, the tray: all from this checkout, nothing installed.
run: build
	@bash dist/dev/run.sh $(BIN)

# Installs with `cloudprotect install` (see docs/INSTALL.md): the programs,
# the systemd unit, autostart and desktop entries, icons and man pages, then
# asks about the Security Network on a terminal (INSTALL_FLAGS=--participate
# or --no-participate answer for it). With DESTDIR it only stages the files.
INSTALL_FLAGS ?=
install: build
	$(BIN)/cloudprotect install --prefix $(PREFIX) --bin-dir $(BIN) $(if $(DESTDIR),--root $(DESTDIR) --no-consent) $(INSTALL_FLAGS)
	install -m 0755 $(BIN)/cloudprotect-server $(DESTDIR)$(PREFIX)/bin/

# The Debian package bin/cloudprotect_<version>_<arch>.deb, staged by the
# same code as `cloudprotect install --prefix /usr` (needs dpkg-deb).
.PHONY: deb
deb:
	@mkdir -p $(BIN)/deb
	$(GO) build -trimpath -buildmode=pie -ldflags '$(LDFLAGS)' -o $(BIN)/deb/ ./cmd/cloudprotectd ./cmd/cloudprotect ./cmd/cloudprotect-tray
	$(GO) run ./dist/mkdeb -bin $(BIN)/deb -out $(BIN) -version '$(VERSION)'

# The fault suite (agent/faults, needs root): the real binaries killed
# during exec storms and uploads, a full disk, hostile files, clients and
# servers, consent withdrawn mid-upload, every byte sent checked for
# privacy. FAULTS=full for the long form (60 kills, more loops).
FAULTS   ?= ci
faults:
	CLOUDPROTECT_FAULTS=$(FAULTS) $(GO) test -count=1 -v -timeout 30m ./agent/faults

# A mixed run of SOAKTIME sampling the agent's memory, descriptors and
# threads, which must stay flat (needs root); figures in docs/SECURITY.md.
SOAKTIME ?= 10m
soak:
	CLOUDPROTECT_SOAK=$(SOAKTIME) $(GO) test -count=1 -v -run '^TestSoak$$' -timeout 60m ./agent/faults

# Every fuzz target for FUZZTIME each.
fuzz:
	@bash dist/dev/fuzz.sh $(FUZZTIME)

# Redraw the tray icons from icons/src/*.svg (needs rsvg-convert, Debian
# librsvg2-bin); the results are committed, so a build needs no rasterizer.
icons:
	$(GO) run ./icons/internal/gen -dir icons -sheet docs/img/tray-icons.png

# Screenshots of the analysts' console, taken by its browser test in
# headless Chromium (Debian package chromium), into docs/img.
console-shots:
	CLOUDPROTECT_CONSOLE_SHOTS=$(CURDIR)/docs/img $(GO) test -count=1 -run '^TestConsoleInABrowser$$' ./server/console/

clean:
	rm -rf $(BIN) .run
