# cryptnbd: `make run` starts the daemon with a demo disk; `make test`
# installs what the tests need and runs them all.

GO        ?= go
BIN       := bin/cryptnbd
DATA_DIR  ?= $(CURDIR)/.cryptnbd
FUZZTIME  ?= 10s
# Debian packages the interop tests drive: real NBD clients, cryptsetup for
# the LUKS2 checks, python3-cryptography for the independent XTS decryption,
# promtool (prometheus) and systemd-analyze (systemd) for the deploy/ checks.
TEST_PKGS := libnbd-bin nbdfuse qemu-utils fio cryptsetup-bin nbdkit \
             python3-cryptography python3-libnbd e2fsprogs fuse3 util-linux \
             prometheus systemd
TEST_CMDS := nbdinfo nbdcopy nbdsh nbdfuse qemu-io qemu-img fio cryptsetup nbdkit mkfs.ext4 fusermount3 \
             promtool systemd-analyze

.PHONY: all build run run-azure test test-deps vet unit fuzz bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/cryptnbd

run: build
	$(BIN) serve --data-dir $(DATA_DIR) --demo-disk demo --listen 127.0.0.1:10809 --metrics-listen 127.0.0.1:9090

# The same with disks stored as Azure page blobs, in Azurite (installed,
# pinned, into .cache/azurite by deploy/azurite/run.sh): see docs/azure-storage.md.
run-azure: build
	deploy/azurite/demo.sh $(BIN)

test: test-deps vet unit fuzz

# Idempotent: installs only when a command is missing, and apt-get is
# itself idempotent.
test-deps:
	@missing=""; for c in $(TEST_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	python3 -c 'import cryptography' >/dev/null 2>&1 || missing="$$missing python3-cryptography"; \
	if [ -n "$$missing" ]; then \
		echo "installing test dependencies (missing:$$missing)"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(TEST_PKGS); \
	fi
	@# Azurite (the Azure Storage emulator) for the page-blob tests, at the
	@# version deploy/azurite/run.sh pins, into the git-ignored .cache/azurite;
	@# nothing to do when it is already installed.
	@deploy/azurite/run.sh --install

vet:
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi

unit:
	$(GO) test -race -timeout 20m ./...
	@# bench/cmd/benchreport is its own module (it keeps gonum out of the daemon's).
	cd bench/cmd/benchreport && $(GO) test -race ./...

# Each fuzz target runs briefly; go test allows one -fuzz target per run.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzServe$$' -fuzztime $(FUZZTIME) ./nbd
	$(GO) test -run '^$$' -fuzz '^FuzzParseHeader$$' -fuzztime $(FUZZTIME) ./cryptodisk/luks2
	$(GO) test -run '^$$' -fuzz '^FuzzXTSDifferential$$' -fuzztime $(FUZZTIME) ./cryptodisk/xts

# cryptnbd against nbdkit, qemu-nbd and nbd-server (plain and LUKS) over
# fio and nbdcopy; installs the peers if missing. QUICK=1 for a ~2-minute
# smoke run; SIZE, ROUNDS, RUNTIME, TMPFS, SERVERS: see bench/README.md.
bench:
	GO=$(GO) bench/run.sh

clean:
	rm -rf bin
