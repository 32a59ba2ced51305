#!/usr/bin/env bash
# Boot the UVM as an SEV-SNP guest on an SNP host (KVM), by hand.
# `parma vm run --accel kvm --snp --ovmf OVMF --policy POLICY` builds the same
# command line (print it with --print-command).
#
#   qemu/run-snp.sh OVMF_AMDSEV POLICY [UVM_DIR] [CONTROL_SOCKET]
#
# HOST_DATA is the sha256 of the policy: the agent checks it against the
# attestation report, and a relying party checks it with `parma verify
# --expect-host-data`. The launch digest to expect: `parma measure --uvm
# UVM_DIR --ovmf OVMF_AMDSEV --vcpus 1 --vcpu-type EPYC-v4`.
set -euo pipefail
ovmf=${1:?usage: qemu/run-snp.sh OVMF_AMDSEV POLICY [UVM_DIR] [CONTROL_SOCKET]}
policy=${2:?usage: qemu/run-snp.sh OVMF_AMDSEV POLICY [UVM_DIR] [CONTROL_SOCKET]}
uvm=${3:-out/uvm}
control=${4:-/tmp/parma-control.sock}
host_data=$(sha256sum "$policy" | cut -d' ' -f1 | xxd -r -p | base64)

exec qemu-system-x86_64 \
  -machine q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0 \
  -cpu EPYC-v4 -smp 1 -m 512 \
  -nodefaults -no-user-config -nographic -no-reboot \
  -kernel "$uvm/vmlinuz" -initrd "$uvm/initrd.img" -append "$(cat "$uvm/cmdline")" \
  -object memory-backend-memfd,id=ram0,size=512M,share=true \
  -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on,host-data="$host_data" \
  -bios "$ovmf" \
  -serial stdio \
  -device virtio-serial-pci,id=virtio-serial0,disable-legacy=on,iommu_platform=on \
  -chardev socket,id=agent,server=on,wait=off,path="$control" \
  -device virtserialport,bus=virtio-serial0.0,chardev=agent,name=org.parma.agent
