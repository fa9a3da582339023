//! Route (service) and slice for a request: `classify.Classifier`, compiled from the
//! tables Python hands over for each policy generation (`engine.py` builds them).
//!
//! Hosts are compared lower-cased without port, paths are the raw request path, header
//! values are decoded as Latin-1 before a slice rule's regular expression searches them
//! (as Python does).  A rule whose regular expression the `regex` crate cannot compile
//! makes the policy `python_only`: the engine then hands every request to the Python
//! path rather than classify it differently.

use std::collections::HashMap;
use std::net::IpAddr;

use regex::Regex;

use crate::core::Core;

#[derive(Clone, Copy, Debug)]
pub struct Net {
    v6: bool,
    addr: u128,
    mask: u128,
}

impl Net {
    pub fn parse(text: &str) -> Option<Net> {
        let (ip, bits) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u32>().ok()?)),
            None => (text, None),
        };
        let ip: IpAddr = ip.parse().ok()?;
        let (v6, addr, width) = match ip {
            IpAddr::V4(a) => (false, u32::from(a) as u128, 32),
            IpAddr::V6(a) => (true, u128::from(a), 128),
        };
        let bits = bits.unwrap_or(width);
        if bits > width {
            return None;
        }
        let mask = if bits == 0 { 0 } else { (!0u128 << (width - bits)) & if v6 { !0 } else { 0xffff_ffff } };
        Some(Net { v6, addr: addr & mask, mask })
    }

    pub fn contains(&self, ip: &Ip) -> bool {
        self.v6 == ip.v6 && (ip.addr & self.mask) == self.addr
    }
}

/// A client address for CIDR rules (`classify.parse_ip`: IPv4-mapped IPv6 unmapped).
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    v6: bool,
    addr: u128,
}

impl Ip {
    pub fn parse(text: &str) -> Option<Ip> {
        let text = text.split('%').next().unwrap_or("");
        match text.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => Some(Ip { v6: false, addr: u32::from(a) as u128 }),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Some(Ip { v6: false, addr: u32::from(v4) as u128 }),
                None => Some(Ip { v6: true, addr: u128::from(a) }),
            },
        }
    }
}

pub struct Rule {
    pub nets: Vec<Net>,
    /// (index into `Router::wanted`, pattern)
    pub headers: Vec<(usize, Regex)>,
    pub prefixes: Vec<Vec<u8>>,
}

pub struct SliceRules {
    pub slice: usize,
    pub rules: Vec<Rule>,
}

#[derive(Default)]
pub struct Router {
    pub by_host: HashMap<Vec<u8>, Vec<(Vec<u8>, usize)>>,
    pub any_host: Vec<(Vec<u8>, usize)>,
    pub default_service: usize,
    pub slices: Vec<SliceRules>,
    pub default_slice: usize,
    /// Lower-case names of the header fields slice rules read.
    pub wanted: Vec<Vec<u8>>,
    pub uses_ip: bool,
    /// A rule the engine cannot evaluate the way Python does: serve requests in Python.
    pub python_only: bool,
}

impl Router {
    /// (service, slice) of a parsed head (`Classifier.service` and `.slice`).
    pub fn classify(&self, buf: &[u8], h: &crate::head::Head, ip: Option<&Ip>) -> (usize, usize) {
        let path = h.path(buf);
        let service = self.service(&h.host_key, path);
        if self.slices.is_empty() {
            return (service, self.default_slice);
        }
        let header = |i: usize| h.wanted_value(buf, i);
        let ip = if self.uses_ip { ip } else { None };
        (service, self.slice(ip, &header, path))
    }

    /// Exact host routes first (longest prefix), then host-less routes, then the default.
    pub fn service(&self, host: &[u8], path: &[u8]) -> usize {
        if let Some(routes) = self.by_host.get(host) {
            for (prefix, service) in routes {
                if path.starts_with(prefix) {
                    return *service;
                }
            }
        }
        for (prefix, service) in &self.any_host {
            if path.starts_with(prefix) {
                return *service;
            }
        }
        self.default_service
    }

    /// The first slice with a matching rule, else the default; `header(i)` is the value of
    /// wanted field `i` (None when absent: matched as the empty string).
    pub fn slice(&self, ip: Option<&Ip>, header: &dyn Fn(usize) -> Option<Vec<u8>>, path: &[u8]) -> usize {
        for s in &self.slices {
            for rule in &s.rules {
                if !rule.nets.is_empty() {
                    match ip {
                        Some(ip) if rule.nets.iter().any(|n| n.contains(ip)) => {}
                        _ => continue,
                    }
                }
                if !rule.prefixes.is_empty() && !rule.prefixes.iter().any(|p| path.starts_with(p)) {
                    continue;
                }
                let mut ok = true;
                for (i, rx) in &rule.headers {
                    let value = header(*i).unwrap_or_default();
                    let text: String = value.iter().map(|&b| b as char).collect(); // Latin-1
                    if !rx.is_match(&text) {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    return s.slice;
                }
            }
        }
        self.default_slice
    }
}

/// One slice rule as `nativeproxy` passes it: CIDRs, (header name, regular expression)
/// pairs, path prefixes.
pub type RuleArgs = (Vec<String>, Vec<(Vec<u8>, String)>, Vec<Vec<u8>>);

/// Compile a policy generation's routes and slice rules (as `nativeproxy` passes them)
/// into a `Router`, naming services and slices in the engine's tables. A CIDR or regular
/// expression the engine cannot take as Python does marks the router `python_only`.
pub fn compile(
    c: &mut Core,
    routes: Vec<(Option<Vec<u8>>, Vec<u8>, String)>,
    default_service: &str,
    slices: Vec<(String, Vec<RuleArgs>)>,
    default_slice: &str,
) -> Router {
    let mut router = Router::default();
    // Longest prefix first; ties keep config order (a stable sort, as Python's).
    for (host, prefix, service) in routes {
        let sid = c.services.id(&service);
        match host {
            Some(h) => router.by_host.entry(h).or_default().push((prefix, sid)),
            None => router.any_host.push((prefix, sid)),
        }
    }
    for v in router.by_host.values_mut() {
        v.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
    }
    router.any_host.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
    router.default_service = c.services.id(default_service);
    router.default_slice = c.slices.id(default_slice);
    for (name, rules) in slices {
        let slice = c.slices.id(&name);
        let mut compiled = Vec::new();
        for (cidrs, headers, prefixes) in rules {
            let mut nets = Vec::new();
            for cidr in &cidrs {
                match Net::parse(cidr) {
                    Some(n) => nets.push(n),
                    None => router.python_only = true,
                }
            }
            router.uses_ip |= !nets.is_empty();
            let mut hs = Vec::new();
            for (hname, pattern) in headers {
                let i = match router.wanted.iter().position(|w| w == &hname) {
                    Some(i) => i,
                    None => {
                        router.wanted.push(hname);
                        router.wanted.len() - 1
                    }
                };
                match regex::Regex::new(&pattern) {
                    Ok(rx) => hs.push((i, rx)),
                    Err(_) => router.python_only = true,
                }
            }
            compiled.push(Rule { nets, headers: hs, prefixes });
        }
        router.slices.push(SliceRules { slice, rules: compiled });
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let n = Net::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(&Ip::parse("10.1.2.3").unwrap()));
        assert!(!n.contains(&Ip::parse("10.2.0.1").unwrap()));
        assert!(n.contains(&Ip::parse("::ffff:10.1.0.9").unwrap()));
        let any = Net::parse("0.0.0.0/0").unwrap();
        assert!(any.contains(&Ip::parse("1.2.3.4").unwrap()));
        let v6 = Net::parse("fd00::/8").unwrap();
        assert!(v6.contains(&Ip::parse("fd12::1").unwrap()));
        assert!(!v6.contains(&Ip::parse("1.2.3.4").unwrap()));
        assert!(Net::parse("127.0.0.1").unwrap().contains(&Ip::parse("127.0.0.1").unwrap()));
    }
}
