//! The encrypted scratch: a disk from the host becomes swap for the guest,
//! through dm-integrity and authenticated dm-crypt with a key made in the
//! guest for this boot.
//!
//! Containers write to a tmpfs upper layer in guest memory (encrypted by
//! SEV-SNP); what does not fit is swapped out to this device. The host sees
//! only ciphertext: AES-XTS with a random IV per 4 KiB block, and an
//! HMAC-SHA256 over each block, its IV and its sector, kept by dm-integrity
//! next to the data (cryptsetup's `aes-xts-random` with `hmac-sha256`). A
//! block the host changed, or moved from another sector, fails its HMAC:
//! the swap-in fails with EIO and the process gets SIGBUS; it never reads
//! forged data. What this does not give is freshness: the host can put back
//! an older version of a block (its data, IV and tag together), which still
//! verifies, so a process may read what it wrote there before instead of
//! what it wrote last. That is why the policy must allow swap explicitly
//! (`allow_scratch_swap`). The key is 96 bytes from the guest kernel's
//! CRNG, never leaves the guest and dies with it; its only copies in the
//! agent's memory are wiped once the device exists, and the agent's memory
//! is locked, never swapped.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use parma_sys::dm::{Control, CreateFlags, Target};
use zeroize::{Zeroize, Zeroizing};

/// dm-crypt's cipher: composed AEAD, XTS for secrecy, HMAC for integrity.
const CIPHER: &str = "capi:authenc(hmac(sha256),xts(aes))-random";
/// Bytes of integrity metadata per block: the random IV (16) and the HMAC (32).
const TAG_SIZE: u32 = 48;
/// AES-256-XTS key (64 bytes) followed by the HMAC key (32 bytes).
const KEY_SIZE: usize = 96;
/// The smallest scratch disk worth using.
const MIN_SIZE: u64 = 16 << 20;
const INTEGRITY_NAME: &str = "parma-scratch-integrity";
const CRYPT_NAME: &str = "parma-scratch-crypt";

/// The scratch device in use.
#[derive(Debug)]
pub struct Scratch {
    /// The disk's serial.
    pub serial: String,
    /// The swap device (the dm-crypt device).
    pub device: String,
    /// Usable bytes.
    pub bytes: u64,
}

/// Turn `disk` into encrypted swap.
pub fn setup(serial: &str, disk: &Path, disk_size: u64) -> Result<Scratch, String> {
    if disk_size < MIN_SIZE {
        return Err(format!("scratch disk {serial:?} has {disk_size} bytes; at least {MIN_SIZE} are needed"));
    }
    // Whatever the host left there (a forged dm-integrity superblock with
    // other parameters included) is wiped, so dm-integrity formats afresh.
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|err| format!("cannot open {}: {err}", disk.display()))?;
    raw.write_all_at(&[0u8; 4096], 0)
        .and_then(|()| raw.sync_all())
        .map_err(|err| format!("cannot wipe the start of {}: {err}", disk.display()))?;
    drop(raw);

    let control = Control::open().map_err(|err| err.to_string())?;
    let device = disk.display().to_string();
    let integrity = |sectors: u64| Target {
        start: 0,
        length: sectors,
        kind: "integrity".into(),
        params: format!("{device} 0 {TAG_SIZE} D 1 block_size:4096"),
    };
    // A first, tiny mapping formats the device; its status gives the
    // sectors left for data once the tags have their room.
    control
        .create(INTEGRITY_NAME, "", &[integrity(8)], CreateFlags::default())
        .map_err(|err| format!("cannot format {device} for dm-integrity: {err}"))?;
    let status = control.target_status(INTEGRITY_NAME);
    let _ = control.remove(INTEGRITY_NAME);
    let provided = provided_sectors(&status.map_err(|err| err.to_string())?)?;
    let sectors = provided - provided % 8;
    if sectors < 8 {
        return Err(format!("scratch disk {serial:?} leaves no room for data"));
    }
    let integrity_dev = control
        .create(INTEGRITY_NAME, "", &[integrity(sectors)], CreateFlags::default())
        .map_err(|err| format!("cannot open {device} with dm-integrity: {err}"))?;

    let mut key = Zeroizing::new([0u8; KEY_SIZE]);
    let crypt = File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(key.as_mut_slice()))
        .map_err(|err| format!("cannot draw the scratch key: {err}"))
        .and_then(|()| {
            let mut target = Target {
                start: 0,
                length: sectors,
                kind: "crypt".into(),
                params: crypt_params(&key, &integrity_dev.path()),
            };
            let created = control.create(
                CRYPT_NAME,
                "",
                std::slice::from_ref(&target),
                CreateFlags { read_only: false, secret: true },
            );
            // The key's only other copy in this process goes now (the
            // ioctl buffers are wiped by parma-sys).
            target.params.zeroize();
            created.map_err(|err| format!("cannot open the dm-crypt layer of the scratch: {err}"))
        });
    drop(key);
    let crypt = match crypt {
        Ok(crypt) => crypt,
        Err(err) => {
            let _ = control.remove(INTEGRITY_NAME);
            return Err(err);
        }
    };
    let bytes = sectors * 512;
    let swap = crypt.path();
    let started = write_swap_header(&swap, bytes).and_then(|()| {
        let path = std::ffi::CString::new(swap.clone()).map_err(|_| "bad device path".to_string())?;
        parma_sys::swap::swapon(&path).map_err(|err| format!("cannot swap on {swap}: {err}"))
    });
    if let Err(err) = started {
        let _ = control.remove(CRYPT_NAME);
        let _ = control.remove(INTEGRITY_NAME);
        return Err(err);
    }
    tracing::info!("encrypted scratch on disk {serial}: {bytes} bytes of swap on {swap}");
    Ok(Scratch { serial: serial.to_string(), device: swap, bytes })
}

/// dm-crypt's table parameters with the key in hex, written into one
/// allocation of the final size: no intermediate string and no
/// reallocation leaves a copy of the key behind in freed memory.
fn crypt_params(key: &[u8; KEY_SIZE], device: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tail = format!(" 0 {device} 0 2 integrity:{TAG_SIZE}:aead sector_size:4096");
    let mut params = String::with_capacity(CIPHER.len() + 1 + 2 * KEY_SIZE + tail.len());
    params.push_str(CIPHER);
    params.push(' ');
    for byte in key {
        for nibble in [byte >> 4, byte & 0xf] {
            params.push(char::from(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0')));
        }
    }
    params.push_str(&tail);
    params
}

/// `provided_data_sectors` from dm-integrity's status line
/// (`<mismatches> <provided_data_sectors> <recalculate sector or ->`).
fn provided_sectors(status: &[String]) -> Result<u64, String> {
    let line = status.first().ok_or("dm-integrity reported no status")?;
    line.split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| format!("cannot read provided sectors from dm-integrity status {line:?}"))
}

/// The swap header of a device of `bytes` (`mkswap`'s format, version 1).
pub fn swap_header(bytes: u64) -> Result<Vec<u8>, String> {
    let pages = bytes / 4096;
    if pages < 2 {
        return Err("a swap device needs at least two pages".into());
    }
    let last_page = u32::try_from(pages - 1).map_err(|_| "swap device too large".to_string())?;
    let mut page = vec![0u8; 4096];
    let mut put = |offset: usize, data: &[u8]| {
        if let Some(slot) = page.get_mut(offset..offset + data.len()) {
            slot.copy_from_slice(data);
        }
    };
    put(1024, &1u32.to_le_bytes()); // version
    put(1028, &last_page.to_le_bytes());
    put(1032, &0u32.to_le_bytes()); // no bad pages
    put(1052, b"parma-scratch");
    put(4096 - 10, b"SWAPSPACE2");
    Ok(page)
}

fn write_swap_header(device: &str, bytes: u64) -> Result<(), String> {
    let header = swap_header(bytes)?;
    let file = OpenOptions::new().write(true).open(device).map_err(|err| format!("cannot open {device}: {err}"))?;
    file.write_all_at(&header, 0)
        .and_then(|()| file.sync_all())
        .map_err(|err| format!("cannot write the swap header: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_header_is_mkswaps() {
        let header = swap_header(64 << 20).unwrap();
        assert_eq!(&header[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(header[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(header[1028..1032].try_into().unwrap()), (64 << 20) / 4096 - 1);
        assert!(swap_header(4096).is_err());
    }

    #[test]
    fn swap_header_equals_util_linux_mkswap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swap.img");
        std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let out = std::process::Command::new("/usr/sbin/mkswap")
            .args(["-U", "00000000-0000-0000-0000-000000000000", "-L", "parma-scratch"])
            .arg(&path)
            .output()
            .expect("mkswap (util-linux) runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let theirs = std::fs::read(&path).unwrap();
        assert_eq!(swap_header(64 << 20).unwrap(), theirs[..4096]);
    }

    #[test]
    fn crypt_params_spell_the_key_in_hex() {
        let key: [u8; KEY_SIZE] = std::array::from_fn(|i| (i * 7) as u8);
        let params = crypt_params(&key, "/dev/dm-3");
        let expected =
            format!("{CIPHER} {} 0 /dev/dm-3 0 2 integrity:{TAG_SIZE}:aead sector_size:4096", hex::encode(key));
        assert_eq!(params, expected);
        assert_eq!(params.capacity(), params.len(), "one allocation, never grown");
    }

    #[test]
    fn integrity_status_is_parsed() {
        assert_eq!(provided_sectors(&["0 1986560 -".into()]).unwrap(), 1_986_560);
        assert!(provided_sectors(&[]).is_err());
        assert!(provided_sectors(&["0".into()]).is_err());
    }
}
