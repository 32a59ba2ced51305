#!/usr/bin/env bash
# Boot the UVM by hand under emulation (TCG): no SEV-SNP protection, for
# development. `parma vm run` builds the same command line.
#
#   qemu/run-tcg.sh [UVM_DIR] [CONTROL_SOCKET]
# The serial console is on your terminal; the agent's port is a unix socket
# that `parma agent ping --control CONTROL_SOCKET` talks to.
set -euo pipefail
uvm=${1:-out/uvm}
control=${2:-/tmp/parma-control.sock}

exec qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -smp 1 -m 512 \
  -nodefaults -no-user-config -nographic -no-reboot \
  -kernel "$uvm/vmlinuz" -initrd "$uvm/initrd.img" -append "$(cat "$uvm/cmdline")" \
  -serial stdio \
  -device virtio-serial-pci,id=virtio-serial0 \
  -chardev socket,id=agent,path="$control",server=on,wait=off \
  -device virtserialport,bus=virtio-serial0.0,chardev=agent,name=org.parma.agent
