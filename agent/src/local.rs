//! Local listeners: loopback only, and on Linux only for this user's programs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether the agent may listen on `addr`: loopback addresses only.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether the program that connected from `peer` to our `local` address runs as the same user
/// as this agent. `Ok(None)` where the platform cannot tell.
pub fn same_user(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<bool>> {
    #[cfg(target_os = "linux")]
    {
        let owner = linux::socket_owner(peer, local)?;
        let me = rustix::process::geteuid().as_raw();
        // A connection whose socket cannot be found (closed already) is refused.
        Ok(Some(owner == Some(me)))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (local, peer);
        Ok(None)
    }
}

#[cfg(any(target_os = "linux", test))]
mod linux {
    use super::*;

    /// The uid owning the live TCP socket whose local address is `socket_local` and remote
    /// address is `socket_remote`, in this network namespace: asked of the kernel for that one
    /// socket (`NETLINK_SOCK_DIAG`), or, where that is not allowed, read from `/proc/net/tcp` and
    /// `/proc/net/tcp6` — which the kernel builds by walking every socket, milliseconds each.
    #[cfg(target_os = "linux")]
    pub(super) fn socket_owner(
        socket_local: SocketAddr,
        socket_remote: SocketAddr,
    ) -> io::Result<Option<u32>> {
        let (local, remote) = (unmapped(socket_local), unmapped(socket_remote));
        if let Ok(owner) = diag::owner(local, remote) {
            return Ok(owner);
        }
        proc_owner(local, remote)
    }

    /// [`socket_owner`] from the `/proc/net/tcp*` tables.
    #[cfg(target_os = "linux")]
    pub(super) fn proc_owner(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
        if local.is_ipv4() && remote.is_ipv4() {
            let table = std::fs::read_to_string("/proc/net/tcp")?;
            if let Some(uid) = find_owner(&table, local, remote) {
                return Ok(Some(uid));
            }
            // A dual-stack client socket lists IPv4 peers as mapped IPv6 addresses.
            let table = std::fs::read_to_string("/proc/net/tcp6")?;
            return Ok(find_owner(&table, mapped(local), mapped(remote)));
        }
        let table = std::fs::read_to_string("/proc/net/tcp6")?;
        Ok(find_owner(&table, local, remote))
    }

    /// Exact lookups of one TCP socket with `NETLINK_SOCK_DIAG` (`inet_diag`, Linux 4.x and later).
    #[cfg(target_os = "linux")]
    pub(super) mod diag {
        use std::io;
        use std::net::{IpAddr, SocketAddr};

        use rustix::net::{
            AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, send, socket,
        };

        const SOCK_DIAG_BY_FAMILY: u16 = 20;
        const NLMSG_ERROR: u16 = 2;
        const NLM_F_REQUEST: u16 = 1;
        const IPPROTO_TCP: u8 = 6;
        const AF_INET: u8 = 2;
        const AF_INET6: u8 = 10;
        const HEADER: usize = 16;
        /// In `inet_diag_msg`: 4 bytes, the 48-byte socket id, expires, rqueue, wqueue, then uid
        /// and inode.
        const UID_AT: usize = 4 + 48 + 12;

        /// The uid owning the live socket `local` → `remote` (an IPv4 socket, or a dual-stack
        /// IPv6 one holding the same addresses mapped), `None` when there is none.
        pub(in super::super) fn owner(
            local: SocketAddr,
            remote: SocketAddr,
        ) -> io::Result<Option<u32>> {
            let fd = socket(
                AddressFamily::NETLINK,
                SocketType::RAW,
                Some(netlink::SOCK_DIAG),
            )?;
            let families: &[u8] = if local.is_ipv4() && remote.is_ipv4() {
                &[AF_INET, AF_INET6]
            } else {
                &[AF_INET6]
            };
            for &family in families {
                let request = request(family, local, remote);
                send(&fd, &request, SendFlags::empty())?;
                let mut answer = [0u8; 1024];
                let (len, _) = recv(&fd, &mut answer[..], RecvFlags::empty())?;
                if let Some(uid) = parse(&answer[..len.min(answer.len())])? {
                    return Ok(Some(uid));
                }
            }
            Ok(None)
        }

        fn request(family: u8, local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
            let address = |addr: SocketAddr| -> [u8; 16] {
                let mut bytes = [0u8; 16];
                match (family, addr.ip()) {
                    (AF_INET, IpAddr::V4(v4)) => bytes[..4].copy_from_slice(&v4.octets()),
                    (_, IpAddr::V4(v4)) => bytes = v4.to_ipv6_mapped().octets(),
                    (_, IpAddr::V6(v6)) => bytes = v6.octets(),
                }
                bytes
            };
            let mut message = Vec::with_capacity(HEADER + 56);
            message.extend_from_slice(&72u32.to_ne_bytes());
            message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
            message.extend_from_slice(&1u32.to_ne_bytes());
            message.extend_from_slice(&0u32.to_ne_bytes());
            message.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
            message.extend_from_slice(&u32::MAX.to_ne_bytes());
            message.extend_from_slice(&local.port().to_be_bytes());
            message.extend_from_slice(&remote.port().to_be_bytes());
            message.extend_from_slice(&address(local));
            message.extend_from_slice(&address(remote));
            message.extend_from_slice(&0u32.to_ne_bytes());
            message.extend_from_slice(&u32::MAX.to_ne_bytes());
            message.extend_from_slice(&u32::MAX.to_ne_bytes());
            message
        }

        /// The uid in an answer; `None` for no such socket, or one no longer live (inode 0).
        pub(in super::super) fn parse(answer: &[u8]) -> io::Result<Option<u32>> {
            let word = |at: usize| -> io::Result<u32> {
                answer
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer")
                    })
            };
            let kind = answer
                .get(4..6)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer")
                })?;
            match kind {
                NLMSG_ERROR => {
                    let errno = word(HEADER)? as i32;
                    if errno == -2 {
                        Ok(None)
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    let (uid, inode) = (word(HEADER + UID_AT)?, word(HEADER + UID_AT + 4)?);
                    Ok((inode != 0).then_some(uid))
                }
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected sock_diag answer type {other}"),
                )),
            }
        }
    }

    /// Finds the `uid` column of the row for a live socket (inode not 0: not TIME_WAIT) in a
    /// `/proc/net/tcp*` table.
    pub(super) fn find_owner(
        table: &str,
        socket_local: SocketAddr,
        socket_remote: SocketAddr,
    ) -> Option<u32> {
        table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, uid, inode) = (
                fields.get(1)?,
                fields.get(2)?,
                fields.get(7)?,
                fields.get(9)?,
            );
            let live = *inode != "0";
            (live
                && parse_address(local)? == socket_local
                && parse_address(remote)? == socket_remote)
                .then(|| uid.parse().ok())
                .flatten()
        })
    }

    #[cfg(all(test, target_os = "linux"))]
    pub(super) fn unmapped_for_test(addr: SocketAddr) -> SocketAddr {
        unmapped(addr)
    }

    /// `::ffff:a.b.c.d` as `a.b.c.d`.
    fn unmapped(addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
            IpAddr::V4(_) => addr,
        }
    }

    /// `a.b.c.d` as `::ffff:a.b.c.d`.
    #[cfg(target_os = "linux")]
    fn mapped(addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            IpAddr::V6(_) => addr,
        }
    }

    /// Parses `0100007F:1F90`: the address as the kernel's in-memory words in hex, the port
    /// as a number in hex.
    fn parse_address(field: &str) -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
        let ip = match ip.len() {
            8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
            32 => {
                let mut bytes = [0u8; 16];
                for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                    chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
                }
                IpAddr::V6(Ipv6Addr::from(bytes))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::linux::find_owner;
    use super::*;

    /// Rows as a little-endian Linux prints them.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0D3D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:0D3D 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   2: 0100007F:C350 0100007F:0D3D 01 00000000:00000000 00:00000000 00000000  1000        0 1002 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:0D3D 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:C351 00000000000000000000000001000000:0D3D 01 00000000:00000000 00:00000000 00000000  65534        0 2001 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    #[cfg(target_endian = "little")]
    fn finds_the_client_side_row() {
        let server: SocketAddr = "127.0.0.1:3389".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(
            find_owner(TCP, client, server),
            Some(1000),
            "a TIME_WAIT row (uid 0) is not the live socket"
        );
        assert_eq!(
            find_owner(TCP, server, client),
            Some(0),
            "the other direction is the listener's side"
        );
        assert_eq!(
            find_owner(TCP, "127.0.0.1:1".parse().unwrap(), server),
            None
        );
        let v6_client: SocketAddr = "[::1]:50001".parse().unwrap();
        let v6_server: SocketAddr = "[::1]:3389".parse().unwrap();
        assert_eq!(find_owner(TCP6, v6_client, v6_server), Some(65534));
        assert_eq!(find_owner("garbage\n1: x y", client, server), None);
    }

    #[test]
    fn only_loopback() {
        for ok in [
            "127.0.0.1:993",
            "127.1.2.3:1",
            "[::1]:993",
            "[::ffff:127.0.0.1]:993",
        ] {
            assert!(is_loopback(&ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "0.0.0.0:993",
            "192.0.2.1:993",
            "[::]:993",
            "[2001:db8::1]:993",
        ] {
            assert!(!is_loopback(&bad.parse().unwrap()), "{bad}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_real_connection_is_ours() {
        let mut tried = 0;
        for listen in ["127.0.0.1:0", "[::1]:0", "[::ffff:127.0.0.1]:0"] {
            // Machines without IPv6 have no ::1.
            let Ok(listener) = std::net::TcpListener::bind(listen) else {
                continue;
            };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, peer) = listener.accept().unwrap();
            assert_eq!(
                same_user(accepted.local_addr().unwrap(), peer).unwrap(),
                Some(true),
                "{listen}"
            );
            drop(client);
            tried += 1;
        }
        assert!(tried >= 2, "at least the IPv4 listeners were tried");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sock_diag_and_proc_agree() {
        let me = rustix::process::geteuid().as_raw();
        let mut tried = 0;
        for listen in ["127.0.0.1:0", "[::1]:0", "[::ffff:127.0.0.1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(listen) else {
                continue;
            };
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, peer) = listener.accept().unwrap();
            let local = accepted.local_addr().unwrap();
            // The client's socket: its local address is the peer, its remote the listener.
            let (from, to) = (
                linux::unmapped_for_test(peer),
                linux::unmapped_for_test(local),
            );
            assert_eq!(linux::diag::owner(from, to).unwrap(), Some(me), "{listen}");
            assert_eq!(linux::proc_owner(from, to).unwrap(), Some(me), "{listen}");
            // A socket that does not exist has no owner.
            let nobody = SocketAddr::new(from.ip(), 1);
            assert_eq!(linux::diag::owner(nobody, to).unwrap(), None, "{listen}");
            tried += 1;
        }
        assert!(tried >= 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sock_diag_errors_are_errors() {
        let mut answer = vec![0u8; 20];
        answer[4..6].copy_from_slice(&2u16.to_ne_bytes());
        answer[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(linux::diag::parse(&answer).is_err());
        answer[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        assert_eq!(linux::diag::parse(&answer).unwrap(), None);
        assert!(linux::diag::parse(&answer[..10]).is_err());
    }
}
