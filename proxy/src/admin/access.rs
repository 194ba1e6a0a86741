//! Who may use the admin listener: the `Host` rule and the bearer token.
//!
//! A web page can reach a listener on 127.0.0.1 by DNS rebinding: its own
//! name, re-pointed at 127.0.0.1, makes the browser send the page's requests
//! to the listener with the page's name in `Host`. So the listener answers
//! only to IP literals, `localhost` and the names given to
//! `--admin-allowed-host`. A request without any `Host` (HTTP/1.0 tools) is
//! answered: browsers always send one.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::{HeaderMap, Uri, header};

use crate::config::{AdminConfig, AdminToken};
use crate::error::ProxyError;

/// Routes that `--admin-open-metrics` leaves open with a token set.
const SCRAPER_PATHS: [&str; 2] = ["/metrics", "/healthz"];

/// Checks the `Host` rule, then the bearer token where one is set; the
/// refusal otherwise.
pub(super) fn check(
    config: &AdminConfig,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    check_host(uri, headers, &config.allowed_hosts)?;
    match &config.token {
        Some(_) if config.open_metrics && SCRAPER_PATHS.contains(&uri.path()) => Ok(()),
        Some(token) => check_bearer(token, headers),
        None => Ok(()),
    }
}

/// Refuses the request when its URI authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1.1 target) or any `Host` header names a host the
/// listener does not answer to.
fn check_host(uri: &Uri, headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    let authority = uri.authority().map(|a| a.as_str().as_bytes());
    let hosts = headers.get_all(header::HOST).iter().map(|v| v.as_bytes());
    for host in authority.into_iter().chain(hosts) {
        let answered = std::str::from_utf8(host).is_ok_and(|h| host_allowed(h, allowed));
        if !answered {
            let shown: String = String::from_utf8_lossy(host).chars().take(100).collect();
            return Err(ProxyError::HostNotAllowed(shown));
        }
    }
    Ok(())
}

/// Whether the listener answers to `value` (`host[:port]`): an IPv4 or a
/// bracketed IPv6 literal, `localhost`, or one of `allowed` (lower case, no
/// trailing dot, as `--admin-allowed-host` keeps them).
pub(super) fn host_allowed(value: &str, allowed: &[String]) -> bool {
    match parse_host(value) {
        Some(Host::Ip) => true,
        Some(Host::Name(name)) => name == "localhost" || allowed.contains(&name),
        None => false,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Host {
    Ip,
    Name(String),
}

/// The host of a `Host` value, or `None` when the value is malformed.
fn parse_host(value: &str) -> Option<Host> {
    let port_ok = |port: &str| port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = value.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<Ipv6Addr>().ok()?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return port_ok.then_some(Host::Ip);
    }
    let host = match value.rsplit_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => value,
    };
    if host.parse::<Ipv4Addr>().is_ok() {
        return Some(Host::Ip);
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    name_ok.then_some(Host::Name(name))
}

/// Refuses a request whose `Authorization` is not `Bearer <the token>`.
fn check_bearer(token: &AdminToken, headers: &HeaderMap) -> Result<(), ProxyError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer(value.as_bytes()));
    match presented {
        Some(presented) if token.matches(presented) => Ok(()),
        Some(_) => Err(ProxyError::Unauthorized { presented: true }),
        None => Err(ProxyError::Unauthorized { presented: false }),
    }
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    let scheme_ok = scheme[..6].eq_ignore_ascii_case(b"bearer") && scheme[6] == b' ';
    let credentials = rest.trim_ascii();
    (scheme_ok && !credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn ip_literals_and_localhost_are_answered_with_or_without_a_port() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:9464",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9464",
            "[fe80::1]:1",
            "localhost",
            "LocalHost:9464",
            "localhost.:9464",
            "127.0.0.1:",
        ] {
            assert!(host_allowed(host, &[]), "{host}");
        }
    }

    #[test]
    fn other_names_only_when_allowed() {
        let allowed = vec!["sluice.internal".to_owned()];
        assert!(host_allowed("sluice.internal:9464", &allowed));
        assert!(host_allowed("SLUICE.internal.", &allowed));
        for host in [
            "evil.example",
            "evil.example:9464",
            "sluice.internal.evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for host in [
            "",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:port",
            "[evil.example]",
            "127.0.0.1:99999999",
            "localhost:x",
            "user@127.0.0.1",
            "local host",
            ":9464",
        ] {
            assert!(!host_allowed(host, &[]), "{host:?}");
        }
    }

    #[test]
    fn the_uri_authority_and_every_host_header_are_checked() {
        let headers = |hosts: &[&'static str]| {
            let mut map = HeaderMap::new();
            for host in hosts {
                map.append(header::HOST, HeaderValue::from_static(host));
            }
            map
        };
        let origin: Uri = "/stats".parse().unwrap();
        let absolute: Uri = "http://evil.example/stats".parse().unwrap();
        assert!(check_host(&origin, &headers(&[]), &[]).is_ok());
        assert!(check_host(&origin, &headers(&["127.0.0.1:1"]), &[]).is_ok());
        assert!(check_host(&origin, &headers(&["localhost", "evil.example"]), &[]).is_err());
        let err = check_host(&absolute, &headers(&["127.0.0.1"]), &[]).unwrap_err();
        assert!(matches!(err, ProxyError::HostNotAllowed(h) if h == "evil.example"));
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        let token = AdminToken::parse("s3cret-token").unwrap();
        let with = |value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            check_bearer(&token, &map)
        };
        assert!(with("Bearer s3cret-token").is_ok());
        assert!(with("bearer   s3cret-token").is_ok());
        for (value, presented) in [
            ("Bearer s3cret-toke", true),
            ("Bearer s3cret-token2", true),
            ("Bearer S3CRET-TOKEN", true),
            ("Basic czNjcmV0LXRva2Vu", false),
            ("Bearer", false),
            ("Bearer ", false),
            ("s3cret-token", false),
        ] {
            assert!(
                matches!(with(value), Err(ProxyError::Unauthorized { presented: p }) if p == presented),
                "{value}"
            );
        }
        assert!(matches!(
            check_bearer(&token, &HeaderMap::new()),
            Err(ProxyError::Unauthorized { presented: false })
        ));
    }
}
