# ringvm: build · guest · run · test · bench · lint
#
# `make run` boots the bundled test guest; `make test` runs everything, from a
# fresh clone, as root (CI's .ci/run calls exactly that). Debian packages and
# Rust components are installed here when missing, so a new machine needs
# nothing by hand.

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
GUEST_DIR ?= $(CURDIR)/target/guest
DEBIAN_KERNEL_DIR ?= $(CURDIR)/target/debian-kernel
RINGVM := $(CURDIR)/target/release/ringvm

# Debian packages: the guest kernel build, its root filesystem, and tools
# the tests use.
APT_PACKAGES := linux-source-6.1 build-essential bc bison flex libelf-dev \
	libssl-dev busybox-static e2fsprogs cpio lz4 xz-utils iproute2 fio curl kmod

.PHONY: all deps build guest debian-kernel testguest broken run test unit-test integration-test lint clean bench bench-blk bench-net

all: build

# Installs only what is missing, so a second run costs a dpkg query.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "[deps] apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
	@python3 -c 'import requests_unixsocket' 2>/dev/null || python3 -m pip install -q requests-unixsocket

build:
	$(CARGO) build --release --locked -p vmm

# The test guest (kernel, root image, initramfs), cached by input hash under
# ~/.cache/ringvm so a second run takes seconds.
guest: deps
	bash resources/guest/build.sh $(GUEST_DIR)

# Debian's own cloud kernel (linux-image-cloud-amd64, fetched with apt-get)
# and a small initramfs with its virtio modules: a distribution kernel
# that finds ringvm's devices and CPUs only through ACPI. Cached under
# ~/.cache/ringvm by package version.
debian-kernel: deps
	bash resources/debian/build.sh $(DEBIAN_KERNEL_DIR)

# Boots the test guest on this console from its ext4 root drive. On a
# terminal, init ends in a busybox shell (type `exit` to reboot, which ends
# ringvm with 0); without one, init runs its checks and reboots at once.
run: build guest
	@if [ -t 0 ]; then halt=shell; else halt=reboot; fi; \
	set -x; $(RINGVM) --kernel $(GUEST_DIR)/vmlinux --boot-timer --cpus 2 \
		--disk path=$(GUEST_DIR)/rootfs.ext4,id=rootfs,root \
		--cmdline "console=ttyS0 reboot=k panic=-1 guest.halt=$$halt"

# ringvm's own virtio test kernel (no_std, x86_64-unknown-none).
testguest:
	bash resources/testguest/build.sh $(CURDIR)/target/testguest

# A test-only ringvm whose block device reports refused requests as OK: the
# test guest must catch it. Built apart so it never replaces the real one.
broken:
	$(CARGO) build --release --locked -p vmm --features broken-status --target-dir $(CURDIR)/target/broken

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

unit-test:
	$(CARGO) test --locked --workspace --exclude ringvm-tests

integration-test: build guest debian-kernel testguest broken
	RINGVM_BIN=$(RINGVM) RINGVM_GUEST_DIR=$(GUEST_DIR) \
		RINGVM_DEBIAN_KERNEL_DIR=$(DEBIAN_KERNEL_DIR) \
		RINGVM_TESTGUEST=$(CURDIR)/target/testguest/vtest.elf \
		RINGVM_BROKEN_BIN=$(CURDIR)/target/broken/release/ringvm \
		$(CARGO) test --locked --release -p ringvm-tests -- --nocapture --test-threads=1

test: deps lint unit-test integration-test

# virtio-blk data path (synthetic driver, real device + VMM loop, no KVM)
# against fio io_uring on the same files; writes target/bench/blk.{json,md}.
# Extra flags: make bench-blk BENCH_ARGS="--seconds 3 --repeats 1"
bench-blk: deps
	$(CARGO) run --release --locked -p ringvm-tests --bin bench_blk -- $(BENCH_ARGS)

# virtio-net data path (synthetic driver, real device + VMM loop + real taps
# in a private network namespace, no KVM) against the same traffic on a tap
# read and written directly; writes target/bench/net.{json,md}. Needs root.
# Extra flags: make bench-net BENCH_NET_ARGS="--seconds 1 --repeats 1"
bench-net: deps
	$(CARGO) run --release --locked -p ringvm-tests --bin bench_net -- $(BENCH_NET_ARGS)

bench: bench-blk bench-net

clean:
	$(CARGO) clean
