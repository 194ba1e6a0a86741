//! `--upstream` URLs to replica addresses.
//!
//! A URL whose host is an IP address is one replica. A host name is every
//! address it resolves to (how a Kubernetes headless Service lists its
//! pods), resolved at start and again every `--resolve-interval`; each
//! address is dialled directly and sent the name as `Host`. Addresses that
//! are all loopback count once (`localhost` is one server, not two), and an
//! address given twice is one replica. A name that does not resolve at
//! start is dialled by name until it does; a later failed resolution keeps
//! the replicas already known.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Uri;

use super::{Address, ReplicaSet};
use crate::upstream::dial_and_host;

/// Whether any of `urls` names a host to resolve (not an IP address).
pub fn has_names(urls: &[Uri]) -> bool {
    urls.iter().any(|u| host_ip(u).is_none())
}

fn host_ip(uri: &Uri) -> Option<IpAddr> {
    let host = uri.host()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The addresses of `urls`, resolving names with `resolve`.
pub fn addresses(urls: &[Uri], resolve: impl Fn(&str) -> Option<Vec<SocketAddr>>) -> Vec<Address> {
    let mut out: Vec<Address> = Vec::new();
    for uri in urls {
        let (authority, host) = dial_and_host(uri);
        let found: Vec<String> = if host_ip(uri).is_some() {
            vec![authority.clone()]
        } else {
            match resolve(&authority) {
                Some(addrs) if !addrs.is_empty() => {
                    distinct(addrs).into_iter().map(|a| a.to_string()).collect()
                }
                _ => vec![authority.clone()],
            }
        };
        for authority in found {
            if !out.iter().any(|a| a.authority == authority) {
                out.push(Address {
                    authority,
                    host: host.clone(),
                });
            }
        }
    }
    out
}

/// Sorted, deduplicated; all-loopback collapses to one (IPv4 first).
fn distinct(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        addrs.truncate(1);
    }
    addrs
}

/// Resolves `authority` (`host:port`) with the system resolver, blocking.
pub fn resolve_now(authority: &str) -> Option<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    authority.to_socket_addrs().ok().map(Iterator::collect)
}

/// Resolves `urls`' names again every `interval` into `set`, until the set
/// is dropped. Each resolution is bounded by the interval.
pub fn follow(set: &Arc<ReplicaSet>, urls: Vec<Uri>, interval: Duration) {
    let weak: Weak<ReplicaSet> = Arc::downgrade(set);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let mut resolved = std::collections::HashMap::new();
            for uri in urls.iter().filter(|u| host_ip(u).is_none()) {
                let (authority, _) = dial_and_host(uri);
                let lookup = tokio::net::lookup_host(authority.clone());
                if let Ok(Ok(addrs)) = tokio::time::timeout(interval, lookup).await {
                    resolved.insert(authority, addrs.collect::<Vec<_>>());
                } else {
                    tracing::warn!(upstream = %authority, "could not resolve; keeping the replicas known");
                }
            }
            let Some(set) = weak.upgrade() else {
                return;
            };
            if resolved.len() < urls.iter().filter(|u| host_ip(u).is_none()).count() {
                continue;
            }
            set.replace(addresses(&urls, |name| resolved.get(name).cloned()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn names_expand_to_their_addresses_and_ips_stay_single() {
        let urls = [uri("http://10.0.0.9:8000/"), uri("http://vllm:8000/")];
        let resolve = |name: &str| {
            assert_eq!(name, "vllm:8000");
            Some(vec![
                "10.0.0.2:8000".parse().unwrap(),
                "10.0.0.1:8000".parse().unwrap(),
                "10.0.0.9:8000".parse().unwrap(),
            ])
        };
        let got = addresses(&urls, resolve);
        let names: Vec<&str> = got.iter().map(|a| a.authority.as_str()).collect();
        assert_eq!(names, ["10.0.0.9:8000", "10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(got[1].host, "vllm:8000");
        assert_eq!(got[0].host, "10.0.0.9:8000");
        assert!(has_names(&urls));
        assert!(!has_names(&urls[..1]));
    }

    #[test]
    fn loopback_names_count_once_and_unresolved_names_are_dialled_by_name() {
        let urls = [uri("http://localhost:8000/")];
        let both = |_: &str| {
            Some(vec![
                "[::1]:8000".parse().unwrap(),
                "127.0.0.1:8000".parse().unwrap(),
            ])
        };
        let got = addresses(&urls, both);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].authority, "127.0.0.1:8000");
        let got = addresses(&urls, |_| None);
        assert_eq!(got[0].authority, "localhost:8000");
    }
}
