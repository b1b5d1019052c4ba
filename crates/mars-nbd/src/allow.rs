//! The allow-list of client addresses: single addresses and CIDR prefixes,
//! IPv4 and IPv6. An IPv4 client reaching an IPv6 socket (`::ffff:a.b.c.d`)
//! is matched as the IPv4 address it is.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One entry: an address and how many leading bits of it must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Net {
    type Err = String;

    /// `ADDR` (the address alone) or `ADDR/PREFIX`; host bits must be zero.
    fn from_str(s: &str) -> Result<Net, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(a.trim())
            .map_err(|_| format!("{s:?} is not an IP address or CIDR prefix"))?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0 to {max}")),
            },
        };
        let net = Net { addr, prefix };
        let host_bits_clear = match addr {
            IpAddr::V4(v) => u32::from(v) & !mask32(prefix) == 0,
            IpAddr::V6(v) => u128::from(v) & !mask128(prefix) == 0,
        };
        if !host_bits_clear {
            let masked = match addr {
                IpAddr::V4(v) => IpAddr::from((u32::from(v) & mask32(prefix)).to_be_bytes()),
                IpAddr::V6(v) => IpAddr::from((u128::from(v) & mask128(prefix)).to_be_bytes()),
            };
            return Err(format!(
                "{s:?} has host bits set: did you mean {masked}/{prefix}?"
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// Client addresses allowed to connect; connections from any other address
/// are closed at accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowList(Vec<Net>);

impl AllowList {
    /// Parse every entry; the error names the first bad one.
    pub fn parse<I, S>(entries: I) -> Result<AllowList, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        entries
            .into_iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<Vec<Net>, String>>()
            .map(AllowList)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    pub fn entries(&self) -> &[Net] {
        &self.0
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_prefixes() {
        let l = AllowList::parse([
            "127.0.0.1",
            "10.0.0.0/8",
            "fd00::/8",
            "::1",
            "192.0.2.128/25",
        ])
        .unwrap();
        for ok in [
            "127.0.0.1",
            "10.0.0.0",
            "10.255.255.255",
            "fd12::5",
            "::1",
            "::ffff:10.1.2.3",
            "::ffff:127.0.0.1",
            "192.0.2.200",
        ] {
            assert!(l.allows(ip(ok)), "{ok} must be allowed");
        }
        for no in [
            "127.0.0.2",
            "11.0.0.0",
            "9.255.255.255",
            "fe80::1",
            "::2",
            "192.0.2.127",
            "::ffff:11.0.0.1",
        ] {
            assert!(!l.allows(ip(no)), "{no} must be refused");
        }
        assert_eq!(
            l.to_string(),
            "127.0.0.1, 10.0.0.0/8, fd00::/8, ::1, 192.0.2.128/25"
        );
    }

    #[test]
    fn zero_prefix_allows_the_whole_family() {
        let l = AllowList::parse(["0.0.0.0/0"]).unwrap();
        assert!(l.allows(ip("203.0.113.9")));
        assert!(!l.allows(ip("2001:db8::1")));
        let l = AllowList::parse(["::/0"]).unwrap();
        assert!(l.allows(ip("2001:db8::1")));
        assert!(!l.allows(ip("203.0.113.9")));
    }

    #[test]
    fn an_empty_list_allows_nobody() {
        assert!(!AllowList::parse(Vec::<String>::new())
            .unwrap()
            .allows(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_are_named() {
        for (bad, says) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("localhost", "not an IP address"),
            ("10.0.0.0/x", "prefix length"),
            ("", "not an IP address"),
        ] {
            let e = AllowList::parse(["127.0.0.1", bad]).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
