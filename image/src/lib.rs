//! Builds the Parma UVM image on the host: the reproducible initrd, the check
//! of the kernel config, the command line and the manifest.
//!
//! Host only: the guest never links it. Scripts call its binary,
//! `parma-image`; the test harness uses the library to build test variants
//! of the initrd.

pub mod initrd;
pub mod kconfig;
pub mod manifest;

/// The kernel command line of the default profile.
///
/// `quiet` keeps the serial console (slow under emulation) to errors;
/// `panic=-1` turns a kernel panic into a reset, which QEMU's `-no-reboot`
/// turns into an exit, so a broken guest never hangs its host. `acpi=off`:
/// the ACPI tables the host's firmware hands over are not measured, and
/// their AML, run by the kernel, could read guest memory (on x86 the
/// interpreter maps RAM for `SystemMemory` regions) and write it to I/O
/// ports; without ACPI the UVM ends by a reset (init), and SMP needs an MP
/// table (SeaBIOS has one, OVMF none: one vCPU there). See
/// docs/threat-model.md.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 acpi=off";

/// Guest memory of the IGVM file, MiB: its e820 map and zero pages are
/// measured, so the memory size is part of the file and of its digest. The
/// same as `parma vm run`'s default.
pub const IGVM_MEMORY_MIB: u32 = 512;

/// The files `make image` writes into the UVM directory.
pub mod files {
    /// The kernel (bzImage).
    pub const KERNEL: &str = "vmlinuz";
    /// The initrd.
    pub const INITRD: &str = "initrd.img";
    /// The kernel's final config.
    pub const KERNEL_CONFIG: &str = "kernel.config";
    /// `make kernelrelease`.
    pub const KERNEL_RELEASE: &str = "kernel.release";
    /// Debian package and version of the kernel source.
    pub const KERNEL_SOURCE: &str = "kernel.source";
    /// The kernel command line.
    pub const CMDLINE: &str = "cmdline";
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// The UVM as one IGVM file, for SNP hosts that boot IGVM (QEMU 10.1+).
    pub const IGVM: &str = "uvm.igvm";
}
