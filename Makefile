# The two commands: `make image` builds the UVM into out/uvm, `make test`
# builds it and runs every test. `make bench` measures; `make lint` checks style.
# `make node-image` packs the UVM, the shim, the snapshotter and parma into
# out/node (an OCI image layout), signed with RELEASE_KEY (made if missing).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

UVM := out/uvm
GUEST_BIN := target/x86_64-unknown-linux-gnu/guest
IMAGE_TOOL := target/release/parma-image
NODE_BIN := target/x86_64-unknown-linux-gnu/release
RELEASE_KEY ?= $(HOME)/.config/parma/release-key.pem
# The node image test rebuilds out/node with the same key.
export PARMA_RELEASE_KEY := $(abspath $(RELEASE_KEY))
OVMF_SUFFIX := qemu/ovmf/ovmf_AmdSev_suffix.bin
export PARMA_UVM := $(abspath $(UVM))
export PARMA_GUEST_BIN := $(abspath $(GUEST_BIN))

.PHONY: all image node-image test bench lint deps host guest kernel oracle clean

all: image

deps:
	scripts/deps.sh

host: deps
	cargo build --release --locked -p parma-image -p parma -p parma-shim -p parma-snapshotter

guest: deps
	scripts/build-guest.sh

kernel: host
	PARMA_IMAGE=$(IMAGE_TOOL) scripts/kernel.sh $(UVM)

image: kernel guest
	$(IMAGE_TOOL) assemble --uvm $(UVM) --init $(GUEST_BIN)/parma-init \
	  --agent $(GUEST_BIN)/parma-agent --rustc "$$(rustc -V)" \
	  --ovmf qemu/ovmf/ovmf_AmdSev_suffix.bin --ovmf-hash "$$(cat qemu/ovmf/ovmf_AmdSev.hash)"

node-image: image
	scripts/build-node.sh
	@if [ ! -f "$(RELEASE_KEY)" ]; then mkdir -p "$$(dirname "$(RELEASE_KEY)")"; \
	  echo "making a development release key: $(RELEASE_KEY)"; target/release/parma node keygen --out "$(RELEASE_KEY)"; fi
	target/release/parma node build --uvm $(UVM) --bin-dir $(NODE_BIN) --release-key "$(RELEASE_KEY)" \
	  --ovmf $(OVMF_SUFFIX) --ovmf-hash "$$(cat qemu/ovmf/ovmf_AmdSev.hash)" --out out/node

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

oracle:
	scripts/oracle.sh >/dev/null

test: image node-image lint oracle
	mkdir -p out
	cargo test --workspace --locked 2>&1 | tee out/test.log
	scripts/test-summary.sh out/test.log

bench: image
	cargo run --release --locked -p parma-tests --bin bench-policy
	cargo run --release --locked -p parma-tests --bin bench-attest
	cargo run --release --locked -p parma-tests --bin bench-layer
	cargo run --release --locked -p parma-tests --bin bench-boot
	cargo run --release --locked -p parma-tests --bin bench-e2e
	cargo run --release --locked -p parma-tests --bin bench-net
	cargo run --release --locked -p parma-tests --bin bench-cri

clean:
	rm -rf out target
