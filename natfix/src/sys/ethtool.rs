//! The ethtool ioctl (SIOCETHTOOL) for the few settings natfix reads or
//! changes: GRO, and netdev features by name. Runs in the calling thread's
//! network namespace.

use std::os::fd::AsRawFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// ethtool's legacy GRO ioctls (`ETHTOOL_GGRO` / `ETHTOOL_SGRO`).
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    // char ifr_name[IFNAMSIZ]: bytes to the kernel, whatever c_char's sign.
    name: [u8; libc::IFNAMSIZ],
    data: *mut u8,
    _pad: [u8; 16],
}

/// SIOCETHTOOL on `iface` with `buf`, an ethtool command structure (its
/// first u32 is the command) that the kernel reads and writes in place.
fn ethtool_ioctl(iface: &str, buf: *mut u8) -> std::io::Result<()> {
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: buf, _pad: [0; 16] };
    for (dst, src) in req.name.iter_mut().zip(iface.as_bytes().iter().take(libc::IFNAMSIZ - 1)) {
        *dst = *src;
    }
    // SAFETY: SIOCETHTOOL reads req and reads/writes *buf, which the caller
    // sized for the command; both live for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ethtool_value(iface: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    ethtool_ioctl(iface, (&raw mut value).cast())?;
    Ok(value.data)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Whether `iface` has a netdev feature named `name` (as `ethtool -k` lists
/// them) switched on; feature bit numbers differ between kernels, names do not.
pub fn netdev_feature_active(iface: &str, name: &str) -> std::io::Result<bool> {
    // struct ethtool_sset_info { cmd, reserved, u64 sset_mask, u32 data[1] }
    let mut info = [0u8; 20];
    info[..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
    info[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
    ethtool_ioctl(iface, info.as_mut_ptr())?;
    let count = u32_at(&info, 16) as usize;
    // struct ethtool_gstrings { cmd, string_set, len, u8 data[len * 32] }
    let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    strings[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
    strings[8..12].copy_from_slice(&u32::try_from(count).unwrap_or(0).to_ne_bytes());
    ethtool_ioctl(iface, strings.as_mut_ptr())?;
    let Some(bit) = strings[12..].chunks(ETH_GSTRING_LEN).position(|s| s.split(|b| *b == 0).next() == Some(name.as_bytes())) else {
        return Ok(false);
    };
    // struct ethtool_gfeatures { cmd, size, blocks[size] { available, requested, active, never_changed } }
    let blocks = count.div_ceil(32);
    let mut features = vec![0u8; 8 + blocks * 16];
    features[..4].copy_from_slice(&ETHTOOL_GFEATURES.to_ne_bytes());
    features[4..8].copy_from_slice(&u32::try_from(blocks).unwrap_or(0).to_ne_bytes());
    ethtool_ioctl(iface, features.as_mut_ptr())?;
    let active = u32_at(&features, 8 + (bit / 32) * 16 + 8);
    Ok(active & (1 << (bit % 32)) != 0)
}

/// Whether GRO is on for `iface`.
pub fn gro_enabled(iface: &str) -> std::io::Result<bool> {
    ethtool_value(iface, ETHTOOL_GGRO, 0).map(|v| v != 0)
}

/// Switches GRO on or off for `iface`.
pub fn set_gro(iface: &str, on: bool) -> std::io::Result<()> {
    ethtool_value(iface, ETHTOOL_SGRO, u32::from(on)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_netdev_features_by_name() {
        // lo always has the loopback feature and never offloads ESP.
        assert!(netdev_feature_active("lo", "loopback").unwrap());
        assert!(!netdev_feature_active("lo", "esp-hw-offload").unwrap());
        assert!(!netdev_feature_active("lo", "no-such-feature").unwrap());
        assert!(netdev_feature_active("natfix-no-such-if", "loopback").is_err());
    }
}
