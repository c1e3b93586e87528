//! Which registries the proxy may reach. A proxy every pod can ask for `localhost:7439/<host>/…`
//! must not become a way into the node's or the cluster's private network: by default only hosts
//! whose addresses are all public are reached; loopback, link-local (cloud metadata), private,
//! and cluster-internal names are refused unless allowed explicitly with `--allow-registry` or
//! `--insecure-registry`. The check runs on the resolved addresses (a DNS resolver that drops
//! refused ones) and on every redirect, so neither DNS nor a 302 can route around it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why a registry or address was refused. Carried through reqwest's error chain and recognised
/// again by [`find_refusal`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{target} is not an allowed registry: {why} (allow it with --allow-registry)")]
pub struct Refusal {
    pub target: String,
    pub why: &'static str,
}

/// One `--allow-registry` pattern: `host`, `host:port`, `*.domain` or `*.domain:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Lowercase host, or the suffix `.domain` for a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("`{text}`: the port must be a number"))?;
                (h.to_owned(), Some(port))
            }
            _ => (text.clone(), None),
        };
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (format!(".{rest}"), true),
            None => (host, false),
        };
        if host.is_empty() || host == "." || host.contains('*') || host.contains('/') {
            return Err(format!(
                "`{text}` is not a registry pattern: use host, host:port, *.domain or *.domain:port"
            ));
        }
        Ok(Pattern {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let host_ok = if self.wildcard {
            host.ends_with(&self.host)
        } else {
            host == self.host
        };
        host_ok && (self.port.is_none() || self.port == port)
    }
}

/// The allow rules, shared by the request path, the DNS resolver and the redirect policy.
#[derive(Debug, Clone, Default)]
pub struct RegistryPolicy {
    patterns: Vec<Pattern>,
    /// `host:port` (or `host`) reached over http, allowed whatever their addresses.
    insecure: HashSet<String>,
}

impl RegistryPolicy {
    /// `allow` are `--allow-registry` patterns; `insecure` are `--insecure-registry` entries
    /// and the configured cache registry, which are allowed by being named.
    pub fn new<A, I>(allow: A, insecure: I) -> Result<Self, String>
    where
        A: IntoIterator<Item = String>,
        I: IntoIterator<Item = String>,
    {
        let patterns = allow
            .into_iter()
            .map(|p| Pattern::parse(&p))
            .collect::<Result<_, _>>()?;
        let insecure = insecure
            .into_iter()
            .map(|r| r.to_ascii_lowercase())
            .collect();
        Ok(RegistryPolicy { patterns, insecure })
    }

    /// Named explicitly: any address is fine.
    pub fn explicitly_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        let bracketed = port.map(|p| format!("[{host}]:{p}"));
        self.insecure.contains(&host)
            || with_port.is_some_and(|hp| self.insecure.contains(&hp))
            || bracketed.is_some_and(|hp| self.insecure.contains(&hp))
            || self.patterns.iter().any(|p| p.matches(&host, port))
    }

    /// Named explicitly on some port: what the DNS resolver can check (it does not see ports).
    fn host_allowed_on_some_port(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.patterns.iter().any(|p| p.matches(&host, p.port))
            || self.insecure.iter().any(|entry| {
                entry == &host
                    || entry.rsplit_once(':').is_some_and(|(h, _)| {
                        h.trim_start_matches('[').trim_end_matches(']') == host
                    })
            })
    }

    /// Checks a `host[:port]` before any connection: IP literals and internal names are decided
    /// here; other names are decided on their resolved addresses.
    pub fn precheck(&self, host: &str, port: Option<u16>) -> Result<(), Refusal> {
        if self.explicitly_allowed(host, port) {
            return Ok(());
        }
        let refuse = |why| {
            Err(Refusal {
                target: match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_owned(),
                },
                why,
            })
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        // The resolver lets this host's addresses through whatever the port (it cannot see
        // ports), so a host allowed on one port only is refused on the others here.
        if self.host_allowed_on_some_port(bare) {
            return refuse("the registry is allowed on another port only");
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return match classify(ip) {
                AddressClass::Public => Ok(()),
                class => refuse(class.reason()),
            };
        }
        let lower = host.to_ascii_lowercase();
        let internal = lower == "localhost"
            || [
                "localhost",
                "local",
                "internal",
                "svc",
                "cluster.local",
                "localdomain",
            ]
            .iter()
            .any(|suffix| lower.ends_with(&format!(".{suffix}")))
            || !lower.contains('.');
        if internal {
            return refuse("the name is local or cluster-internal");
        }
        Ok(())
    }

    /// Checks a URL a registry redirected to.
    pub fn check_redirect(&self, url: &reqwest::Url, from_https: bool) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default();
        self.precheck(host, port)?;
        if from_https && url.scheme() != "https" && !self.explicitly_allowed(host, port) {
            return Err(Refusal {
                target: url.to_string(),
                why: "a redirect from https to plain http",
            });
        }
        Ok(())
    }

    /// Filters resolved addresses of `host`: all of them when the host is allowed by name,
    /// else only public ones (none left is a refusal).
    pub fn filter_resolved(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        if self.host_allowed_on_some_port(host) {
            return Ok(addrs);
        }
        let mut reason = "it resolves to no address";
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match classify(a.ip()) {
                AddressClass::Public => true,
                class => {
                    reason = class.reason();
                    false
                }
            })
            .collect();
        if kept.is_empty() {
            return Err(Refusal {
                target: host.to_owned(),
                why: reason,
            });
        }
        Ok(kept)
    }
}

/// What kind of address an IP is, for the allow rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Public,
    Loopback,
    LinkLocal,
    Private,
    Unspecified,
    Other,
}

impl AddressClass {
    fn reason(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "it is a loopback address",
            AddressClass::LinkLocal => "it is link-local (cloud metadata lives there)",
            AddressClass::Private => "it is a private or cluster-internal address",
            AddressClass::Unspecified => "it is the unspecified address",
            AddressClass::Other => "it is a reserved, multicast or documentation address",
        }
    }
}

/// Classifies an address. IPv4-mapped IPv6 addresses are judged as the IPv4 they carry.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_link_local() {
        AddressClass::LinkLocal
    } else if ip.is_private() || (a == 100 && (64..=127).contains(&b)) {
        // RFC 1918 and carrier-grade NAT (often pod or node networks).
        AddressClass::Private
    } else if a == 0
        || a >= 224
        || ip.is_broadcast()
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && (18..=19).contains(&b))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        AddressClass::Other
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if first & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if first & 0xfe00 == 0xfc00 {
        // Unique local addresses: the IPv6 private range.
        AddressClass::Private
    } else if first & 0xff00 == 0xff00 || first == 0x2001 && ip.segments()[1] == 0x0db8 {
        AddressClass::Other
    } else {
        AddressClass::Public
    }
}

/// Finds a [`Refusal`] in an error's source chain (reqwest wraps what the resolver or the
/// redirect policy returned).
pub fn find_refusal(err: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(refusal.clone());
        }
        current = e.source();
    }
    None
}

/// A DNS resolver that only hands reqwest the addresses the policy permits.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    pub policy: Arc<RegistryPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter_resolved(&host, addrs)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], insecure: &[&str]) -> RegistryPolicy {
        RegistryPolicy::new(
            allow.iter().map(|s| s.to_string()),
            insecure.iter().map(|s| s.to_string()),
        )
        .unwrap()
    }

    #[test]
    fn classifies_addresses() {
        let cases = [
            ("8.8.8.8", AddressClass::Public),
            ("2606:4700::1111", AddressClass::Public),
            ("127.0.0.1", AddressClass::Loopback),
            ("127.9.9.9", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("169.254.169.254", AddressClass::LinkLocal),
            ("fe80::1", AddressClass::LinkLocal),
            ("10.96.0.1", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("fd00::1", AddressClass::Private),
            ("::ffff:169.254.169.254", AddressClass::LinkLocal),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("0.0.0.0", AddressClass::Unspecified),
            ("224.0.0.1", AddressClass::Other),
            ("192.0.2.1", AddressClass::Other),
        ];
        for (ip, want) in cases {
            assert_eq!(classify(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn refuses_internal_targets_unless_named() {
        let p = policy(&[], &["127.0.0.1:5000"]);
        assert!(
            p.precheck("127.0.0.1", Some(5000)).is_ok(),
            "insecure entries are allowed"
        );
        let err = p.precheck("127.0.0.1", Some(5001)).unwrap_err();
        assert!(err.to_string().contains("another port"), "{err}");
        let err = p.precheck("127.0.0.2", Some(5000)).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(
            p.precheck("169.254.169.254", None)
                .unwrap_err()
                .why
                .contains("link-local")
        );
        assert!(p.precheck("10.0.0.5", Some(443)).is_err());
        assert!(p.precheck("[::1]", Some(5000)).is_err());
        assert!(p.precheck("registry.kube-system.svc", None).is_err());
        assert!(p.precheck("registry.svc.cluster.local", None).is_err());
        assert!(p.precheck("localhost", Some(5000)).is_err());
        assert!(
            p.precheck("metadata", None).is_err(),
            "single-label names are internal"
        );
        assert!(p.precheck("8.8.8.8", None).is_ok());
        assert!(
            p.precheck("ghcr.io", None).is_ok(),
            "names are judged on their addresses"
        );
    }

    #[test]
    fn patterns_allow_by_name_with_or_without_port() {
        let p = policy(
            &["registry.corp:5000", "*.internal.example", "10.1.2.3"],
            &[],
        );
        assert!(p.precheck("registry.corp", Some(5000)).is_ok());
        assert!(p.precheck("registry.corp", Some(5001)).is_err());
        assert!(p.precheck("a.internal.example", Some(443)).is_ok());
        assert!(
            p.precheck("internal.example.evil.com", None).is_ok(),
            "a public name, judged on DNS"
        );
        assert!(p.precheck("10.1.2.3", Some(443)).is_ok());
        assert!(RegistryPolicy::new(["*".to_string()], Vec::new()).is_err());
        assert!(RegistryPolicy::new(["a:b".to_string()], Vec::new()).is_err());
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let p = policy(&["*.corp"], &[]);
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mixed = vec![a("10.0.0.1:0"), a("8.8.8.8:0")];
        assert_eq!(
            p.filter_resolved("evil.example", mixed.clone()).unwrap(),
            vec![a("8.8.8.8:0")]
        );
        let err = p
            .filter_resolved("evil.example", vec![a("169.254.169.254:0")])
            .unwrap_err();
        assert!(err.why.contains("link-local"));
        assert_eq!(p.filter_resolved("git.corp", mixed.clone()).unwrap(), mixed);
    }

    #[test]
    fn redirects_are_checked_too() {
        let p = policy(&[], &["127.0.0.1:5000"]);
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(
            p.check_redirect(&url("https://cdn.example.com/blob"), true)
                .is_ok()
        );
        assert!(
            p.check_redirect(&url("http://169.254.169.254/latest/meta-data"), false)
                .is_err()
        );
        assert!(
            p.check_redirect(&url("http://cdn.example.com/blob"), true)
                .is_err(),
            "no https downgrade"
        );
        assert!(
            p.check_redirect(&url("http://127.0.0.1:5000/x"), false)
                .is_ok()
        );
    }

    #[test]
    fn refusals_are_found_in_error_chains() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Refusal);
        let err = Outer(Refusal {
            target: "x".into(),
            why: "y",
        });
        assert_eq!(find_refusal(&err).unwrap().target, "x");
    }
}
