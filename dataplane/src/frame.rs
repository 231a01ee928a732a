//! Raw Ethernet frames: what the lab and the tests use to send packets a socket never would
//! (ARP with a foreign sender address, router advertisements) from inside a namespace.

#![allow(unsafe_code)] // AF_PACKET sendto; each block has its SAFETY comment

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Sends one frame (destination MAC first) out of interface `ifindex` of the calling thread's
/// network namespace.
pub fn send(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    if frame.len() < 14 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an Ethernet frame has at least 14 bytes",
        ));
    }
    // SAFETY: a plain syscall without pointers.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: u16::from_ne_bytes([frame[12], frame[13]]),
        sll_ifindex: i32::try_from(ifindex).unwrap_or(0),
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `addr` are valid for the lengths passed and outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A broadcast ARP request from `mac` claiming `sender`, asking for `target`.
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x08, 0x06]); // ARP
    f.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend(mac);
    f.extend(sender.octets());
    f.extend([0; 6]);
    f.extend(target.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_requests_are_laid_out_per_rfc826() {
        let f = arp_request(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 99),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "opcode request");
        assert_eq!(&f[28..32], &[10, 0, 0, 99]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert!(send(1, &f[..10]).is_err());
    }
}
