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
	libssl-dev busybox-static e2fsprogs cpio lz4 xz-utils iproute2 fio curl kmod \
	python3-matplotlib
# What only the benchmarks need: callgrind (bench-callgrind), QEMU, the
# reference of bench-boot, and qemu-img (qemu-utils), bench-blk's second
# reference. (python3-matplotlib, for report.png, is above: the report
# code's unit test draws a plot too.)
BENCH_APT_PACKAGES := valgrind qemu-system-x86 qemu-utils

.PHONY: all deps bench-deps build guest debian-kernel testguest runner-root broken run test unit-test \
	integration-test api-conformance lint clean bench bench-blk bench-net bench-limit bench-boot \
	bench-callgrind bench-report bench-p9 fuzz fuzz-check fuzz-deps

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
	@python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install -q schemathesis

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

# A busybox-only root directory for the `ringvm --root-share DIR -- CMD`
# tests (host binaries load slowly where guest code is emulated).
runner-root: deps
	bash resources/runner/busybox-root.sh $(CURDIR)/target/runner-root

# ringvm's own virtio test kernel (no_std, x86_64-unknown-none).
testguest:
	bash resources/testguest/build.sh $(CURDIR)/target/testguest

# A test-only ringvm whose block device reports refused requests as OK (the
# test guest must catch it) and whose VMM thread makes a forbidden syscall
# when RINGVM_TEST_FORBIDDEN_SYSCALL=1 (seccomp must kill it). Built apart
# so it never replaces the real one.
broken:
	$(CARGO) build --release --locked -p vmm --features broken-status,broken-seccomp --target-dir $(CURDIR)/target/broken

lint: deps
	$(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) fmt -- --check
	cd fuzz && $(CARGO) clippy --locked --target-dir $(FUZZ_TARGET_DIR)-clippy --all-targets -- -D warnings
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

unit-test:
	$(CARGO) test --locked --workspace --exclude ringvm-tests

integration-test: build guest debian-kernel testguest broken runner-root
	RINGVM_BIN=$(RINGVM) RINGVM_GUEST_DIR=$(GUEST_DIR) \
		RINGVM_DEBIAN_KERNEL_DIR=$(DEBIAN_KERNEL_DIR) \
		RINGVM_RUNNER_ROOT=$(CURDIR)/target/runner-root \
		RINGVM_TESTGUEST=$(CURDIR)/target/testguest/vtest.elf \
		RINGVM_BROKEN_BIN=$(CURDIR)/target/broken/release/ringvm \
		$(CARGO) test --locked --release -p ringvm-tests -- --nocapture --test-threads=1

# ringvm against its own OpenAPI description (resources/api/ringvm.yaml):
# schemathesis' stateless phases, bounded (about 90 s): no 5xx, every
# status, content type and body as described, schema-violating requests
# refused. See resources/api/conformance.py.
api-conformance: deps build
	python3 resources/api/conformance.py $(RINGVM)

test: deps lint unit-test fuzz-check integration-test api-conformance

bench-deps: deps
	@missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "[bench-deps] apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Every benchmark point runs ringvm and its reference in BENCH_ROUNDS rounds
# (back to back, the order alternating) and reports the median ratio and
# its spread; BENCH_SECONDS is each side's measured time per round.
BENCH_ROUNDS ?= 3
BENCH_SECONDS ?= 1
BENCH_CARGO := $(CARGO) run --release --locked -q -p ringvm-tests --bin

# virtio-blk data path (synthetic driver, real device + VMM loop, no KVM)
# against fio io_uring (the host's limit) and QEMU's block layer without a
# guest (`qemu-img bench`, aio=io_uring; from qemu-utils, which bench-deps
# installs: without it the QEMU column says so) on the same files (tmpfs,
# ext4, ext4 O_DIRECT), all three in the same interleaved rounds; writes
# target/bench/blk.{json,md}. Extra flags: BENCH_ARGS="--only QD32",
# BENCH_ARGS=--no-qemu.
bench-blk: deps
	$(BENCH_CARGO) bench_blk -- --rounds $(BENCH_ROUNDS) --seconds $(BENCH_SECONDS) $(BENCH_ARGS)

# virtio-net data path (synthetic driver, real device + VMM loop + real taps
# in a private network namespace, no KVM) against the same traffic on a tap
# read and written directly; writes target/bench/net.{json,md}. Needs root.
# Extra flags: BENCH_NET_ARGS="--only 1514".
bench-net: deps
	$(BENCH_CARGO) bench_net -- --rounds $(BENCH_ROUNDS) --seconds $(BENCH_SECONDS) $(BENCH_NET_ARGS)

# Rate limiters on the data path (synthetic driver, real device + VMM loop,
# no KVM): a set limit held within ±5% (virtio-blk bandwidth and ops,
# virtio-net TX and RX bandwidth on a real tap in a private network
# namespace: needs root, else those rows are skipped), and a limit far
# above the path against none; writes target/bench/limit.{json,md}.
# Extra flags: BENCH_LIMIT_ARGS="--only net".
bench-limit: deps
	$(BENCH_CARGO) bench_limit -- --rounds $(BENCH_ROUNDS) --seconds $(BENCH_SECONDS) $(BENCH_LIMIT_ARGS)

# virtio-9p (synthetic 9P client, real device + VMM loop, no KVM) against
# pread/statx on the same files, and `ringvm -- CMD`'s time to its first
# output line (KVM); writes target/bench/p9.{json,md}.
# Extra flags: make bench-p9 BENCH_P9_ARGS="--seconds 1 --no-boot"
bench-p9: deps build guest runner-root
	RINGVM_BIN=$(RINGVM) RINGVM_GUEST_DIR=$(GUEST_DIR) \
		$(BENCH_CARGO) bench_p9 -- --seconds $(BENCH_SECONDS) $(BENCH_P9_ARGS)

# ringvm against QEMU's microvm on the same kernel and command line: start
# -> first KVM_RUN and -> API socket (BENCH_BOOT_ROUNDS startups), VMM
# memory and CPU over a boot (BENCH_BOOT_BOOTS boots of each, in turn, a
# minute or more each here); writes target/bench/boot.{json,md}.
BENCH_BOOT_ROUNDS ?= 8
BENCH_BOOT_BOOTS ?= 1
bench-boot: build guest bench-deps
	$(BENCH_CARGO) bench_boot -- --rounds $(BENCH_BOOT_ROUNDS) --boot-rounds $(BENCH_BOOT_BOOTS) $(BENCH_BOOT_ARGS)

# The VMM's instructions per request under callgrind on short fixed
# workloads (noise-free), beside the previous run's figures; writes
# target/bench/callgrind.{json,md} and the profiles in target/bench/callgrind/.
bench-callgrind: bench-deps
	$(CARGO) build --release --locked -q -p ringvm-tests --bins
	$(CURDIR)/target/release/bench_callgrind $(BENCH_CALLGRIND_ARGS)

# One report of everything above: target/bench/report.{md,json,png}.
bench-report: deps
	$(BENCH_CARGO) bench_report

# All benchmarks, then the report (written even when one failed; make
# fails afterwards). The previous results are removed first so none is
# reported stale, except callgrind.json, whose figures the next run shows
# as "previous".
bench: bench-deps build guest
	@rm -f $(addprefix target/bench/,blk.json blk.md net.json net.md limit.json limit.md boot.json boot.md p9.json p9.md report.md report.json report.png)
	@status=0; for t in bench-blk bench-net bench-limit bench-boot bench-callgrind bench-p9; do \
		$(MAKE) --no-print-directory $$t || { echo "[bench] $$t FAILED"; status=1; }; \
	done; \
	$(MAKE) --no-print-directory bench-report; exit $$status

# Fuzzing: fuzz/ is a cargo-fuzz crate (libFuzzer, nightly toolchain), kept
# out of the workspace. Builds are cached outside the clone, so a fresh CI
# checkout on the same machine rebuilds only what changed.
FUZZ_SECONDS ?= 60
FUZZ_CHECK_SECONDS ?= 4
FUZZ_ARGS ?=
FUZZ_TARGET_DIR ?= $(HOME)/.cache/ringvm/fuzz-target
FUZZ_TARGETS := $(shell sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^ringvm-fuzz$$')
CARGO_FUZZ := cargo +nightly fuzz
FUZZ_BUILD_FLAGS := -O --target-dir $(FUZZ_TARGET_DIR)

# cargo-fuzz needs nightly (sanitizers, coverage instrumentation); it is
# not downloaded here (toolchains are not fetched by the Makefile), so its
# absence fails loudly instead of skipping the fuzz check.
fuzz-deps:
	@rustup toolchain list 2>/dev/null | grep -q '^nightly' || { \
		echo "FUZZ: FAILED: no nightly Rust toolchain; cargo-fuzz needs it (rustup toolchain install nightly)" >&2; \
		exit 1; }
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked

# Every target for FUZZ_SECONDS each, growing fuzz/corpus/<target> from the
# committed seeds in fuzz/seeds/<target>. Crashes land in fuzz/artifacts/.
# One target: make fuzz FUZZ_TARGETS=virtio_blk FUZZ_SECONDS=600
fuzz: fuzz-deps
	cd fuzz && $(CARGO_FUZZ) build $(FUZZ_BUILD_FLAGS)
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t seeds/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		$(CARGO_FUZZ) run $(FUZZ_BUILD_FLAGS) $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(FUZZ_ARGS) || exit 1; \
	done

# CI: builds every target and runs each for a few seconds from its seeds,
# so no target rots. Leaves nothing in the tree.
fuzz-check: fuzz-deps
	cd fuzz && $(CARGO_FUZZ) build $(FUZZ_BUILD_FLAGS)
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		scratch=$$(mktemp -d); \
		$(CARGO_FUZZ) run $(FUZZ_BUILD_FLAGS) $$t $$scratch seeds/$$t -- \
			-max_total_time=$(FUZZ_CHECK_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$$scratch/ >$$scratch/log 2>&1; rc=$$?; \
		runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$scratch/log); \
		if [ $$rc -ne 0 ]; then \
			tail -40 $$scratch/log; echo "fuzz-check: $$t FAILED (exit $$rc)"; rm -rf $$scratch; exit 1; \
		fi; \
		echo "fuzz-check: $$t ok ($$runs runs)"; rm -rf $$scratch; \
	done

clean:
	$(CARGO) clean
