#!/usr/bin/env python3
"""An independent launch digest of an IGVM file, for the tests of crates/igvm.

Parses the IGVM binary format with `struct` (not the igvm crate) and replays
the pages into the `sev-snp-measure` package's page chaining (GCTX), with
QEMU's loading rules: pages with data are NORMAL, pages without data ZERO,
unmeasured pages UNMEASURED, secrets and CPUID pages by type; then one VMSA
per vCPU (the file's for the vCPUs it has, the reset state of the vCPU type
for the others).

    igvm-oracle.py FILE VCPUS [VCPU_TYPE]     prints the digest in hex

Run it with the oracle venv's python (scripts/oracle.sh installs it).
"""
import struct
import sys

from sevsnpmeasure.gctx import GCTX
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmsa import VMSA

PAGE = 0x1000
LARGE_PAGE = 0x200000
SUPPORTED_PLATFORM, PARAMETER_AREA, PAGE_DATA, PARAMETER_INSERT, VP_CONTEXT = 0x1, 0x301, 0x302, 0x303, 0x304
PLATFORM_SEV_SNP = 2


def main():
    path, vcpus = sys.argv[1], int(sys.argv[2])
    vcpu_type = sys.argv[3] if len(sys.argv) > 3 else None
    data = open(path, "rb").read()
    magic, version, offset, size, total, _checksum = struct.unpack_from("<6I", data, 0)
    assert magic == 0x4D564749, "not an IGVM file"
    assert total == len(data), "file size does not match the header"

    headers = []
    end = offset + size
    while offset < end:
        kind, length = struct.unpack_from("<2I", data, offset)
        headers.append((kind, data[offset + 8:offset + 8 + length]))
        offset += 8 + (length + 7) // 8 * 8

    mask = None
    for kind, body in headers:
        if kind == SUPPORTED_PLATFORM:
            compat, _vtl, platform = struct.unpack_from("<IBB", body, 0)
            if platform == PLATFORM_SEV_SNP:
                mask = compat
    assert mask is not None, "no SEV-SNP platform"

    gctx = GCTX()
    areas = {}
    vmsas = {}
    for kind, body in headers:
        if kind == PAGE_DATA:
            gpa, compat, file_offset, flags, data_type = struct.unpack_from("<QIIIH", body, 0)
            if not compat & mask:
                continue
            size = LARGE_PAGE if flags & 1 else PAGE
            assert not flags & 4, "shared pages are not measured this way"
            if data_type == 1:
                gctx.update_secrets_page(gpa)
            elif data_type in (2, 3):
                gctx.update_cpuid_page(gpa)
            elif flags & 2:
                gctx.update_unmeasured_pages(gpa, size)
            elif file_offset == 0:
                gctx.update_zero_pages(gpa, size)
            else:
                assert size == PAGE, "the format carries 4 KiB of data per page"
                gctx.update_normal_pages(gpa, data[file_offset:file_offset + PAGE])
        elif kind == PARAMETER_AREA:
            number_of_bytes, index = struct.unpack_from("<QI", body, 0)
            areas[index] = number_of_bytes
        elif kind == PARAMETER_INSERT:
            gpa, compat, index = struct.unpack_from("<QII", body, 0)
            if compat & mask:
                gctx.update_unmeasured_pages(gpa, areas[index])
        elif kind == VP_CONTEXT:
            _gpa, compat, file_offset, vp_index = struct.unpack_from("<QIIH", body, 0)
            if compat & mask:
                vmsas[vp_index] = data[file_offset:file_offset + PAGE]

    reset = None
    if len(vmsas) < vcpus:
        features = struct.unpack_from("<Q", vmsas[0], 0x3B0)[0]
        reset = next(VMSA(SevMode.SEV_SNP, 0, CPU_SIGS[vcpu_type], features).pages(1))
    for vp in range(vcpus):
        gctx.update_vmsa_page(vmsas.get(vp, reset))
    print(gctx.hex_ld())


if __name__ == "__main__":
    main()
