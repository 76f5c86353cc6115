//! What kind of address a connection would reach. A name that resolves to
//! a private, loopback, link-local or metadata address is not the public
//! host policy allowed (DNS rebinding, or a name pointed at the cloud's
//! metadata service): such a connection is its own policy request
//! (`network.connect_private`), which no default rule allows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Public,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier NAT), fc00::/7.
    Private,
    /// 127/8, ::1.
    Loopback,
    /// 169.254/16 (but the metadata address), fe80::/10.
    LinkLocal,
    /// 169.254.169.254 and fd00:ec2::254: cloud instance metadata.
    Metadata,
    /// 0/8, ::, multicast, broadcast, documentation and reserved ranges:
    /// nothing a connection should reach.
    Unroutable,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Public => "public",
            Class::Private => "private",
            Class::Loopback => "loopback",
            Class::LinkLocal => "link_local",
            Class::Metadata => "metadata",
            Class::Unroutable => "unroutable",
        }
    }
}

pub fn classify(addr: IpAddr) -> Class {
    match addr {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            // IPv4 in IPv6 (::ffff:a.b.c.d, and the old ::a.b.c.d) is the
            // IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            if v6.is_unspecified() || v6.is_multicast() {
                Class::Unroutable
            } else if v6.is_loopback() {
                Class::Loopback
            } else if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
                Class::Metadata
            } else if s[0] & 0xfe00 == 0xfc00 {
                Class::Private
            } else if s[0] & 0xffc0 == 0xfe80 {
                Class::LinkLocal
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Class::Unroutable
            } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
                // ::a.b.c.d, deprecated IPv4-compatible.
                classify_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
            } else if s[0] == 0x0064 && s[1] == 0xff9b {
                // NAT64 (64:ff9b::/96): the IPv4 address it stands for.
                classify_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
            } else {
                Class::Public
            }
        }
    }
}

fn classify_v4(v4: Ipv4Addr) -> Class {
    let o = v4.octets();
    if v4 == Ipv4Addr::new(169, 254, 169, 254) {
        Class::Metadata
    } else if v4.is_loopback() {
        Class::Loopback
    } else if v4.is_link_local() {
        Class::LinkLocal
    } else if v4.is_private() || (o[0] == 100 && o[1] & 0xc0 == 64) {
        Class::Private
    } else if o[0] == 0
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
    {
        Class::Unroutable
    } else {
        Class::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        classify(s.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified_whatever_their_spelling() {
        for (addr, want) in [
            ("151.101.0.223", Class::Public),
            ("2a04:4e42::223", Class::Public),
            ("10.1.2.3", Class::Private),
            ("172.31.255.255", Class::Private),
            ("192.168.0.1", Class::Private),
            ("100.64.0.1", Class::Private),
            ("fd12:3456::1", Class::Private),
            ("127.0.0.53", Class::Loopback),
            ("::1", Class::Loopback),
            ("::ffff:127.0.0.1", Class::Loopback),
            ("::127.0.0.1", Class::Loopback),
            ("169.254.1.1", Class::LinkLocal),
            ("fe80::1", Class::LinkLocal),
            ("169.254.169.254", Class::Metadata),
            ("::ffff:169.254.169.254", Class::Metadata),
            ("64:ff9b::a9fe:a9fe", Class::Metadata),
            ("fd00:ec2::254", Class::Metadata),
            ("0.0.0.0", Class::Unroutable),
            ("::", Class::Unroutable),
            ("224.0.0.1", Class::Unroutable),
            ("255.255.255.255", Class::Unroutable),
            ("192.0.2.1", Class::Unroutable),
            ("2001:db8::1", Class::Unroutable),
            ("64:ff9b::808:808", Class::Public),
        ] {
            assert_eq!(class(addr), want, "{addr}");
        }
    }
}
