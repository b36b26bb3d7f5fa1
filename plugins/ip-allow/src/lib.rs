//! ip-allow: lets a request through only when the client's address is on an allow list and
//! not on a deny list (addresses or CIDR networks, IPv4 and IPv6). Needs the `client-addr`
//! grant; without it no address is visible and every request is refused (fail closed).

use std::net::IpAddr;

use serde::Deserialize;
use sluice_sdk::{audit, export_plugin, log, LocalResponse, Plugin, Request, RequestDecision};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Networks let through; empty means everyone (but the denied).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Networks refused, whatever `allow` says.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Status of a refusal (default 403).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Emit a `denied` audit event per refusal.
    #[serde(default)]
    pub audit_denials: bool,
}

fn default_status() -> u16 {
    403
}

/// An address or a network: `192.0.2.7`, `10.0.0.0/8`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Parses `text`; the host bits of a network must be zero (`10.0.0.1/8` is refused: it
    /// is a typo of one kind or the other).
    pub fn parse(text: &str) -> Result<Net, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR network"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        if bits(addr) & !mask(addr, prefix) != 0 {
            return Err(format!(
                "{text:?} has bits set past its /{prefix} (did you mean a network address?)"
            ));
        }
        Ok(Net { addr, prefix })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let m = mask(ip, self.prefix);
        bits(ip) & m == bits(self.addr) & m
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The network bits of a `/prefix` for `ip`'s family, aligned as [`bits`] aligns addresses.
fn mask(ip: IpAddr, prefix: u8) -> u128 {
    let width = if ip.is_ipv4() { 32 } else { 128 };
    if prefix == 0 {
        return 0;
    }
    (u128::MAX << (128 - u32::from(prefix))) >> (128 - width)
}

/// The plugin.
#[derive(Debug)]
pub struct IpAllow {
    allow: Vec<Net>,
    deny: Vec<Net>,
    status: u16,
    audit_denials: bool,
}

impl IpAllow {
    /// Whether `ip` may pass.
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|n| n.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip))
    }

    fn refuse(&self, reason: &str, client: &str) -> RequestDecision {
        if self.audit_denials {
            audit::emit("denied", &[("reason", reason), ("client", client)]);
        }
        RequestDecision::new().respond(LocalResponse::new(self.status).text("forbidden\n"))
    }
}

fn parse_all(list: &[String], key: &str) -> Result<Vec<Net>, String> {
    list.iter()
        .map(|t| Net::parse(t).map_err(|e| format!("{key}: {e}")))
        .collect()
}

impl Plugin for IpAllow {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(400..=599).contains(&config.status) {
            return Err(format!(
                "status {} is not an error status (400-599)",
                config.status
            ));
        }
        Ok(IpAllow {
            allow: parse_all(&config.allow, "allow")?,
            deny: parse_all(&config.deny, "deny")?,
            status: config.status,
            audit_denials: config.audit_denials,
        })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        let Some(ip) = req.client_ip() else {
            log::warn("no client address: grant ip-allow `client-addr` (refusing the request)");
            return self.refuse("no-client-address", "");
        };
        match ip.parse::<IpAddr>() {
            Ok(addr) if self.admits(addr) => RequestDecision::new(),
            Ok(_) => self.refuse("not-allowed", ip),
            Err(_) => self.refuse("unparsable-client-address", ip),
        }
    }
}

export_plugin!(IpAllow);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{self, granted, Grant};

    fn plugin(config: &str) -> Result<IpAllow, String> {
        sluice_sdk::load(config.as_bytes())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_v4_v6_and_mapped_addresses() {
        let n = Net::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.200.1.2")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("2001:db8::1")));
        let v6 = Net::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(Net::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!Net::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        assert!(Net::parse("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(Net::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn bad_entries_are_refused_with_their_key() {
        for (config, expect) in [
            (
                r#"{"allow": ["10.0.0.1/8"]}"#,
                "allow: \"10.0.0.1/8\" has bits set",
            ),
            (
                r#"{"deny": ["10.0.0.0/33"]}"#,
                "deny: \"10.0.0.0/33\": the prefix length",
            ),
            (r#"{"allow": ["example.com"]}"#, "is not an IP address"),
            (r#"{"status": 200}"#, "not an error status"),
        ] {
            let err = plugin(config).err().unwrap();
            assert!(err.contains(expect), "{config}: {err}");
        }
        assert!(plugin(r#"{"alow": []}"#)
            .unwrap_err()
            .contains("unknown field"));
    }

    #[test]
    fn deny_wins_and_an_empty_allow_list_admits_the_rest() {
        let p = plugin(r#"{"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.9.0.0/16"]}"#)
            .unwrap();
        assert!(p.admits(ip("10.1.1.1")));
        assert!(!p.admits(ip("10.9.1.1")));
        assert!(p.admits(ip("2001:db8::5")));
        assert!(!p.admits(ip("192.0.2.1")));
        let open = plugin(r#"{"deny": ["192.0.2.0/24"]}"#).unwrap();
        assert!(open.admits(ip("198.51.100.1")));
        assert!(!open.admits(ip("192.0.2.200")));
    }

    #[test]
    fn requests_are_answered_by_address_and_fail_closed_without_the_grant() {
        testing::reset();
        let p = plugin(r#"{"allow": ["203.0.113.0/24"], "audit-denials": true}"#).unwrap();
        let inside = Request::new("GET", "https://app.test/").with_client_addr("203.0.113.5:5000");
        assert_eq!(p.on_request(&inside), RequestDecision::new());
        let outside =
            Request::new("GET", "https://app.test/").with_client_addr("[2001:db8::1]:443");
        assert_eq!(p.on_request(&outside).respond.unwrap().status, 403);
        let hidden = granted(inside.clone(), &[]);
        assert_eq!(p.on_request(&hidden).respond.unwrap().status, 403);
        assert!(testing::logs()[0].1.contains("client-addr"));
        let kinds: Vec<_> = testing::events()
            .iter()
            .map(|e| e.get("reason").unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["not-allowed", "no-client-address"]);
        assert_eq!(
            granted(inside, &[Grant::ClientAddr]).client_ip(),
            Some("203.0.113.5")
        );
    }
}
