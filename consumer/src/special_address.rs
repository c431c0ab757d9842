//! Which IP addresses a webhook must not reach: the blocks of the IANA special-purpose address
//! registries that are not globally reachable, and the rest of the address space that is not
//! public unicast. Pure: no I/O, one table per family.
//!
//! Sources (as of 2025):
//! - IANA IPv4 Special-Purpose Address Registry (RFC 6890),
//!   <https://www.iana.org/assignments/iana-ipv4-special-registry/>, plus 224.0.0.0/4 multicast
//!   (RFC 5771) and 240.0.0.0/4 reserved (RFC 1112) from the IPv4 address space registry;
//! - IANA IPv6 Special-Purpose Address Registry,
//!   <https://www.iana.org/assignments/iana-ipv6-special-registry/>, plus fec0::/10 site-local
//!   (deprecated, RFC 3879), ff00::/8 multicast and "outside 2000::/3" from the IPv6 address space
//!   registry <https://www.iana.org/assignments/ipv6-address-space/>: every public unicast
//!   address is in 2000::/3, the rest is reserved, local or multicast.
//!
//! Registry entries marked globally reachable (AS112 192.31.196.0/24 and 192.175.48.0/24, AMT
//! 192.52.193.0/24) are public services and stay allowed; inside 2001::/23 the few globally
//! reachable anycast blocks are refused with the rest, as no webhook receiver lives there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

/// An address a webhook must not be connected to, and the block it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialAddress {
    /// The address examined.
    pub address: IpAddr,
    /// For an IPv6 address that carries an IPv4 one (IPv4-mapped, NAT64, 6to4): that IPv4 address
    /// and how it is carried. The block is then the IPv4 address's.
    pub embedded: Option<(Ipv4Addr, &'static str)>,
    /// The block, with its article: "a loopback address".
    pub block: &'static str,
}

impl fmt::Display for SpecialAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            None => write!(f, "{} is {}", self.address, self.block),
            Some((v4, how)) => write!(f, "{} is {how} of {v4}, {}", self.address, self.block),
        }
    }
}

/// `Some` when `ip` is not a public unicast address. An IPv6 address that carries an IPv4 one
/// (IPv4-mapped `::ffff:0:0/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by the IPv4
/// address it leads to.
pub fn classify(ip: IpAddr) -> Option<SpecialAddress> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4).map(|block| SpecialAddress {
            address: ip,
            embedded: None,
            block,
        }),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// IPv4 blocks in the registry's notation and what each is; the first match wins.
const V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "a \"this network\" address"),
    ("10.0.0.0/8", "a private-use address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private-use address"),
    // 192.0.0.0/24 holds DS-Lite, NAT64 discovery, PCP and TURN anycast, all local.
    ("192.0.0.0/24", "an IETF protocol assignment"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private-use address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the limited broadcast address"),
    ("240.0.0.0/4", "a reserved address"),
];

/// What an IPv6 block means for a webhook.
#[derive(Clone, Copy)]
enum Rule {
    /// Refused whatever the rest of the address.
    Special(&'static str),
    /// Carries an IPv4 address (how, where): judged by that address.
    Carries(&'static str, fn(u128) -> Ipv4Addr),
}

fn low_32(bits: u128) -> Ipv4Addr {
    Ipv4Addr::from(bits as u32)
}

fn sixtofour(bits: u128) -> Ipv4Addr {
    // 2002:AABB:CCDD::/48 carries AA.BB.CC.DD in bits 16..48.
    Ipv4Addr::from((bits >> 80) as u32)
}

/// IPv6 blocks in the registry's notation and what each means; the first match wins, so more
/// specific blocks come first.
const V6: &[(&str, Rule)] = &[
    ("::/128", Rule::Special("the unspecified address")),
    ("::1/128", Rule::Special("the loopback address")),
    (
        "::ffff:0:0/96",
        Rule::Carries("the IPv4-mapped form", low_32),
    ),
    // Deprecated (RFC 4291 2.5.5.1) and never routed: refused whatever IPv4 address it holds.
    (
        "::/96",
        Rule::Special("a deprecated IPv4-compatible address"),
    ),
    ("64:ff9b::/96", Rule::Carries("the NAT64 form", low_32)),
    // Local-use translation (RFC 8215): where the IPv4 address sits depends on the local prefix.
    ("64:ff9b:1::/48", Rule::Special("a local-use NAT64 address")),
    ("100::/64", Rule::Special("a discard-only address")),
    ("2001::/32", Rule::Special("a Teredo address")),
    ("2001::/23", Rule::Special("an IETF protocol assignment")),
    ("2001:db8::/32", Rule::Special("a documentation address")),
    ("2002::/16", Rule::Carries("the 6to4 form", sixtofour)),
    ("3fff::/20", Rule::Special("a documentation address")),
    ("5f00::/16", Rule::Special("an SRv6 SID address")),
    ("fc00::/7", Rule::Special("a unique local address")),
    ("fe80::/10", Rule::Special("a link-local address")),
    (
        "fec0::/10",
        Rule::Special("a deprecated site-local address"),
    ),
    ("ff00::/8", Rule::Special("a multicast address")),
];

/// A row of [`V4`] or [`V6`] as bits: an address is in the block when `bits & mask == network`.
struct Block<R> {
    network: u128,
    mask: u128,
    rule: R,
}

/// The address's bits and how many there are (32 or 128).
fn bits_of(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// Parses a table; a malformed row is a bug the unit tests catch.
fn parse_table<R: Copy>(table: &[(&str, R)]) -> Vec<Block<R>> {
    table
        .iter()
        .map(|&(cidr, rule)| {
            let (address, prefix) = cidr.split_once('/').expect(cidr);
            let (network, width) = bits_of(address.parse().expect(cidr));
            let prefix: u32 = prefix.parse().expect(cidr);
            assert!(prefix <= width, "{cidr}");
            let mask =
                u128::MAX.checked_shl(width - prefix).unwrap_or(0) & (u128::MAX >> (128 - width));
            Block {
                network,
                mask,
                rule,
            }
        })
        .collect()
}

/// The rule of the first block holding `bits`.
fn first_match<R: Copy>(blocks: &[Block<R>], bits: u128) -> Option<R> {
    blocks
        .iter()
        .find(|b| bits & b.mask == b.network)
        .map(|b| b.rule)
}

static V4_BLOCKS: LazyLock<Vec<Block<&'static str>>> = LazyLock::new(|| parse_table(V4));
static V6_BLOCKS: LazyLock<Vec<Block<Rule>>> = LazyLock::new(|| parse_table(V6));

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    first_match(&V4_BLOCKS, u128::from(u32::from(ip)))
}

fn classify_v6(ip: Ipv6Addr) -> Option<SpecialAddress> {
    let bits = u128::from(ip);
    let special = |block| SpecialAddress {
        address: IpAddr::V6(ip),
        embedded: None,
        block,
    };
    match first_match(&V6_BLOCKS, bits) {
        Some(Rule::Special(block)) => Some(special(block)),
        Some(Rule::Carries(how, extract)) => {
            let v4 = extract(bits);
            classify_v4(v4).map(|block| SpecialAddress {
                address: IpAddr::V6(ip),
                embedded: Some((v4, how)),
                block,
            })
        }
        // Global unicast is 2000::/3; everything else is reserved by the IETF.
        None if bits >> 125 != 0b001 => Some(special("a reserved address (outside 2000::/3)")),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str) -> Option<&'static str> {
        classify(text.parse().expect(text)).map(|s| s.block)
    }

    #[test]
    fn every_table_row_is_a_network_without_host_bits() {
        for block in V4_BLOCKS.iter() {
            assert_eq!(block.network & !block.mask, 0, "{:x}", block.network);
        }
        for block in V6_BLOCKS.iter() {
            assert_eq!(block.network & !block.mask, 0, "{:x}", block.network);
        }
    }

    #[test]
    fn special_blocks_are_refused_with_their_name() {
        for (address, expected) in [
            ("0.0.0.0", "a \"this network\" address"),
            ("0.1.2.3", "a \"this network\" address"),
            ("10.1.2.3", "a private-use address"),
            ("100.64.0.1", "a shared (carrier-grade NAT) address"),
            ("100.127.255.255", "a shared (carrier-grade NAT) address"),
            ("127.0.0.1", "a loopback address"),
            ("127.255.0.9", "a loopback address"),
            ("169.254.169.254", "a link-local address"),
            ("172.16.0.1", "a private-use address"),
            ("172.31.255.255", "a private-use address"),
            ("192.0.0.1", "an IETF protocol assignment"),
            ("192.0.0.170", "an IETF protocol assignment"),
            ("192.0.2.1", "a documentation address"),
            ("192.88.99.1", "a 6to4 relay anycast address"),
            ("192.168.1.1", "a private-use address"),
            ("198.18.0.1", "a benchmarking address"),
            ("198.19.255.255", "a benchmarking address"),
            ("198.51.100.7", "a documentation address"),
            ("203.0.113.9", "a documentation address"),
            ("224.0.0.1", "a multicast address"),
            ("239.255.255.250", "a multicast address"),
            ("240.0.0.1", "a reserved address"),
            ("254.1.1.1", "a reserved address"),
            ("255.255.255.255", "the limited broadcast address"),
            ("::", "the unspecified address"),
            ("::1", "the loopback address"),
            ("::ffff:127.0.0.1", "a loopback address"),
            ("::ffff:10.0.0.1", "a private-use address"),
            ("::ffff:169.254.169.254", "a link-local address"),
            ("::7f00:1", "a deprecated IPv4-compatible address"),
            ("::8.8.8.8", "a deprecated IPv4-compatible address"),
            ("64:ff9b::7f00:1", "a loopback address"),
            ("64:ff9b::a9fe:a9fe", "a link-local address"),
            ("64:ff9b:1::1", "a local-use NAT64 address"),
            ("100::1", "a discard-only address"),
            ("2001::1", "a Teredo address"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo address"),
            ("2001:2::1", "an IETF protocol assignment"),
            ("2001:1ff::1", "an IETF protocol assignment"),
            ("2001:db8::1", "a documentation address"),
            ("2002:7f00:1::", "a loopback address"),
            ("2002:c0a8:101::1", "a private-use address"),
            ("3fff::1", "a documentation address"),
            ("3fff:fff::1", "a documentation address"),
            ("5f00::1", "an SRv6 SID address"),
            ("fc00::1", "a unique local address"),
            ("fd12:3456::1", "a unique local address"),
            ("fe80::1", "a link-local address"),
            ("febf::1", "a link-local address"),
            ("fec0::1", "a deprecated site-local address"),
            ("ff02::1", "a multicast address"),
            ("::ffff:0:7f00:1", "a reserved address (outside 2000::/3)"),
            ("4000::1", "a reserved address (outside 2000::/3)"),
            ("1::1", "a reserved address (outside 2000::/3)"),
        ] {
            assert_eq!(block(address), Some(expected), "{address}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for address in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.255",
            "192.31.196.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:200::1",
            "2001:db9::1",
            "3fff:1000::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(block(address), None, "{address}");
        }
    }

    #[test]
    fn the_reason_names_the_carried_address() {
        let special = classify("::ffff:127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            special.to_string(),
            "::ffff:127.0.0.1 is the IPv4-mapped form of 127.0.0.1, a loopback address"
        );
        let special = classify("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(special.to_string(), "127.0.0.1 is a loopback address");
    }
}
