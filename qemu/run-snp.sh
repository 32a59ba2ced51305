#!/usr/bin/env bash
# Boot the UVM as an SEV-SNP guest on an SNP host (KVM), by hand.
# `parma vm run --accel kvm --snp (--ovmf OVMF | --igvm FILE) --policy POLICY`
# builds the same command line (print it with --print-command; a test checks
# that the two agree).
#
#   qemu/run-snp.sh OVMF_AMDSEV POLICY [UVM_DIR] [CONTROL_SOCKET]   QEMU 9.1+
#   qemu/run-snp.sh --igvm POLICY [UVM_DIR] [CONTROL_SOCKET]        QEMU 10.1+
#
# With OVMF, the firmware checks the kernel, initrd and cmdline against the
# hashes QEMU adds (kernel-hashes=on). With --igvm, QEMU loads
# UVM_DIR/uvm.igvm, which holds every page of the guest; there is no firmware.
#
# HOST_DATA is the sha256 of the policy: the agent checks it against the
# attestation report, and a relying party checks it with `parma verify
# --expect-host-data`. The launch digest to expect: `parma measure --uvm
# UVM_DIR --ovmf OVMF_AMDSEV --vcpus 1 --vcpu-type EPYC-v4`, or `parma measure
# --igvm UVM_DIR/uvm.igvm` (both are in UVM_DIR/manifest.json).
set -euo pipefail
usage="usage: qemu/run-snp.sh (OVMF_AMDSEV | --igvm) POLICY [UVM_DIR] [CONTROL_SOCKET]"
boot=${1:?$usage}
policy=${2:?$usage}
uvm=${3:-out/uvm}
control=${4:-/tmp/parma-control.sock}
host_data=$(sha256sum "$policy" | cut -d' ' -f1 | xxd -r -p | base64)
snp=sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1
machine=q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0

if [ "$boot" = --igvm ]; then
  guest=(-object "$snp,host-data=$host_data" -object "igvm-cfg,id=igvm0,file=$uvm/uvm.igvm")
  machine=$machine,igvm-cfg=igvm0
  kernel=()
else
  guest=(-object "$snp,kernel-hashes=on,host-data=$host_data" -bios "$boot")
  kernel=(-kernel "$uvm/vmlinuz" -initrd "$uvm/initrd.img" -append "$(cat "$uvm/cmdline")")
fi

exec qemu-system-x86_64 \
  -machine "$machine" \
  -cpu EPYC-v4 -smp 1 -m 512 \
  -nodefaults -no-user-config -nographic -no-reboot \
  "${kernel[@]}" \
  -object memory-backend-memfd,id=ram0,size=512M,share=true \
  "${guest[@]}" \
  -serial stdio \
  -device virtio-serial-pci,id=virtio-serial0,disable-legacy=on,iommu_platform=on \
  -chardev socket,id=agent,server=on,wait=off,path="$control" \
  -device virtserialport,bus=virtio-serial0.0,chardev=agent,name=org.parma.agent
