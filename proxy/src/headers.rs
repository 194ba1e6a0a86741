//! Header rules for a forwarding proxy (RFC 9110 §7.6.1): hop-by-hop headers
//! are dropped in both directions, `X-Forwarded-For` gains the client's
//! address, and the tenant key is derived for rate limits and policies.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Headers that describe one connection and never cross a proxy.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `HOP_BY_HOP[i]` for a hop-by-hop `name` (names are lower case in a
/// `HeaderMap`). A string match, not `HOP_BY_HOP.iter().position`: comparing
/// `HeaderName`s cost about 800 more instructions a request (callgrind); a
/// test keeps the two lists the same.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Removes hop-by-hop headers, including any named by `Connection`.
///
/// One pass over the names finds which are present, and only those are
/// removed: most requests carry none, and most responses only
/// `Connection: keep-alive` (callgrind: removing all nine names by hash cost
/// about 1,300 instructions a message).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Extension headers that `Connection` names (the standard ones are
    // handled by `present`; `close` and `keep-alive` are options, not names).
    let named: Vec<HeaderName> = if present & 1 != 0 {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| !token.eq_ignore_ascii_case("close"))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .filter(|name| hop_by_hop_index(name).is_none())
            .collect()
    } else {
        Vec::new()
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
}

/// A client connection's address, with its `X-Forwarded-For` value made once
/// per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's socket address.
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    /// The peer of a connection accepted from `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let forwarded_for = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            addr,
            forwarded_for,
        }
    }

    /// The client's IP address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

/// Appends the client's address to `X-Forwarded-For` (keeping earlier hops).
pub fn append_forwarded_for(headers: &mut HeaderMap, client: &Peer) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            match HeaderValue::try_from(format!("{prior}, {}", client.ip())) {
                Ok(value) => value,
                Err(_) => return,
            }
        }
        _ => client.forwarded_for.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), value);
}

/// The tenant a request belongs to: `X-Tenant`, else a digest of the API key
/// (never the key itself), else the body's `user`, else "".
pub fn tenant_key(headers: &HeaderMap, user: Option<&str>) -> String {
    if let Some(t) = headers.get("x-tenant").and_then(|v| v.to_str().ok()) {
        return t.trim().to_owned();
    }
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let key = auth.strip_prefix("Bearer ").unwrap_or(auth).trim();
        if !key.is_empty() {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            return format!("key:{:016x}", hasher.finish());
        }
    }
    user.unwrap_or_default().to_owned()
}

/// `X-Priority` as an integer (higher is more urgent); 0 when absent or invalid.
pub fn priority(headers: &HeaderMap) -> i32 {
    headers
        .get("x-priority")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        // Order between distinct names carries no meaning (removal reorders them).
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_TYPE), None);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let peer = |ip: &str| Peer::new(SocketAddr::new(ip.parse().unwrap(), 1234));
        append_forwarded_for(&mut h, &peer("10.0.0.1"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, &peer("::1"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
    }

    #[test]
    fn tenant_prefers_header_then_key_then_user() {
        let mut h = HeaderMap::new();
        assert_eq!(tenant_key(&h, Some("alice")), "alice");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-123"),
        );
        let keyed = tenant_key(&h, Some("alice"));
        assert!(
            keyed.starts_with("key:") && !keyed.contains("sk-123"),
            "{keyed}"
        );
        h.insert("x-tenant", HeaderValue::from_static("team-a"));
        assert_eq!(tenant_key(&h, Some("alice")), "team-a");
    }
}
