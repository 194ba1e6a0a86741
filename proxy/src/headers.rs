//! Header rules for a forwarding proxy (RFC 9110 §7.6.1): hop-by-hop headers
//! are dropped in both directions, `X-Forwarded-For` gains the client's
//! address, and the tenant is found for rate limits and policies
//! ([`Tenants`]: who may name it, and the keyed digest of API keys).

use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::Sha256;

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

/// Longest tenant name a request may claim (`X-Tenant`, `user`), in bytes.
pub const MAX_TENANT_LEN: usize = 64;

/// Who a request's tenant is: the trust model.
///
/// By default (clients talk to Sluice directly) only the API key says who a
/// client is: the tenant is a keyed digest of the `Authorization` value,
/// `key:` and 16 hex digits, and every request without a key belongs to one
/// shared anonymous tenant, `""`. The `X-Tenant` header and the body's `user`
/// are claims a client makes about itself, and are ignored.
///
/// With `--trust-tenant-header` (behind a gateway that authenticates
/// clients, sets `X-Tenant` and drops any the client sent) the tenant is
/// `X-Tenant`, else the key's digest, else the body's `user`. A claimed name
/// is 1 to [`MAX_TENANT_LEN`] bytes of `A-Z a-z 0-9 . _ : @ / -`: a bad
/// `X-Tenant` is refused ([`InvalidTenant`]), a bad `user` (an OpenAI field
/// that vLLM accepts in any form) is passed over.
///
/// The digest is HMAC-SHA-256 under a secret: drawn at random for each
/// process, so digests cannot be reversed or compared across processes, or
/// read from `--tenant-hash-key-file`, so that several proxies agree.
#[derive(Clone)]
pub struct Tenants {
    /// Whether `X-Tenant` and `user` name the tenant.
    trust_claims: bool,
    /// HMAC-SHA-256 keyed with the secret; each digest starts from a clone,
    /// so the key's padding blocks are hashed once, not once per request.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of debug output.
        f.debug_struct("Tenants")
            .field("trust_claims", &self.trust_claims)
            .finish_non_exhaustive()
    }
}

/// A claimed tenant name that is not one: never the value itself, which may
/// be large or hostile, only its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "X-Tenant must be 1 to {MAX_TENANT_LEN} bytes of A-Z a-z 0-9 . _ : @ / - (got {len} bytes)"
)]
pub struct InvalidTenant {
    /// The length of the value received, in bytes.
    pub len: usize,
}

impl Tenants {
    /// Digests keyed with `secret` (any length; HMAC hashes long ones).
    pub fn new(trust_claims: bool, secret: &[u8]) -> Self {
        Self {
            trust_claims,
            mac: Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    /// Digests keyed with 32 bytes from the operating system's generator.
    pub fn with_random_secret(trust_claims: bool) -> Result<Self, getrandom::Error> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        Ok(Self::new(trust_claims, &secret))
    }

    /// The tenant of a request with these `headers` and body `user`.
    pub fn of(&self, headers: &HeaderMap, user: Option<&str>) -> Result<String, InvalidTenant> {
        if self.trust_claims
            && let Some(claimed) = headers.get(&X_TENANT)
        {
            return match claimed.to_str() {
                Ok(name) if is_tenant_name(name) => Ok(name.to_owned()),
                _ => Err(InvalidTenant { len: claimed.len() }),
            };
        }
        if let Some(key) = api_key(headers) {
            return Ok(self.digest(key));
        }
        Ok(match user {
            Some(name) if self.trust_claims && is_tenant_name(name) => name.to_owned(),
            _ => String::new(),
        })
    }

    /// `key:` and the first 64 bits of the key's HMAC, in hex.
    fn digest(&self, key: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(key);
        let tag = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag[..8]);
        format!("key:{:016x}", u64::from_be_bytes(first))
    }
}

static X_TENANT: HeaderName = HeaderName::from_static("x-tenant");

/// The credential in `Authorization` (the token of `Bearer TOKEN`, else the
/// whole value); `None` when absent or empty.
fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let key = value.strip_prefix(b"Bearer ").unwrap_or(value).trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// 1 to [`MAX_TENANT_LEN`] bytes of `A-Z a-z 0-9 . _ : @ / -`.
fn is_tenant_name(name: &str) -> bool {
    (1..=MAX_TENANT_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b))
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

    const SECRET: &[u8] = b"a secret of sixteen bytes or more";

    fn request(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn by_default_only_the_api_key_names_the_tenant() {
        let tenants = Tenants::new(false, SECRET);
        let keyed = request(&[("authorization", "Bearer sk-123"), ("x-tenant", "team-a")]);
        let tenant = tenants.of(&keyed, Some("alice")).unwrap();
        assert_eq!(
            tenant,
            tenants
                .of(&request(&[("authorization", "Bearer sk-123")]), None)
                .unwrap()
        );
        assert!(tenant.starts_with("key:"), "{tenant}");
        // Without a key, the header and `user` are claims, and ignored.
        let claims = request(&[("x-tenant", &tenant)]);
        assert_eq!(tenants.of(&claims, Some("alice")).unwrap(), "");
        // Even a claim no trusted tenant could make is no error.
        let huge = "x".repeat(60_000);
        assert_eq!(
            tenants
                .of(&request(&[("x-tenant", &huge)]), Some(&huge))
                .unwrap(),
            ""
        );
    }

    #[test]
    fn trusted_claims_come_first_then_the_key_then_user() {
        let tenants = Tenants::new(true, SECRET);
        let digest = Tenants::new(false, SECRET)
            .of(&request(&[("authorization", "Bearer sk-123")]), None)
            .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(tenants.of(&h, None).unwrap(), "");
        assert_eq!(
            tenants.of(&h, Some("alice@example.com")).unwrap(),
            "alice@example.com"
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-123"),
        );
        assert_eq!(tenants.of(&h, Some("alice")).unwrap(), digest);
        h.insert("x-tenant", HeaderValue::from_static("org/team-a:v1.2_x"));
        assert_eq!(tenants.of(&h, Some("alice")).unwrap(), "org/team-a:v1.2_x");
    }

    #[test]
    fn a_bad_trusted_header_is_refused_without_its_value() {
        let tenants = Tenants::new(true, SECRET);
        let longest = "t".repeat(MAX_TENANT_LEN);
        assert_eq!(
            tenants
                .of(&request(&[("x-tenant", &longest)]), None)
                .unwrap(),
            longest
        );
        let huge = "x".repeat(60 * 1024);
        for (value, len) in [
            (huge.as_str(), huge.len()),
            (&format!("{longest}t"), MAX_TENANT_LEN + 1),
            ("", 0),
            ("team a", 6),
            ("team\"a", 6),
            ("a+b", 3),
        ] {
            let err = tenants
                .of(&request(&[("x-tenant", value)]), None)
                .unwrap_err();
            assert_eq!(err, InvalidTenant { len });
            let message = err.to_string();
            assert!(message.len() < 200, "{message}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(tenants.of(&h, None), Err(InvalidTenant { len: 5 }));
    }

    #[test]
    fn a_bad_trusted_user_is_passed_over() {
        let tenants = Tenants::new(true, SECRET);
        for user in ["", "a b", "ü", &"u".repeat(MAX_TENANT_LEN + 1)] {
            assert_eq!(tenants.of(&HeaderMap::new(), Some(user)).unwrap(), "");
        }
    }

    #[test]
    fn key_digests_are_keyed_stable_and_hide_the_key() {
        let key = |k: &str| request(&[("authorization", k)]);
        let ours = Tenants::new(false, SECRET);
        let digest = ours.of(&key("Bearer sk-123"), None).unwrap();
        assert_eq!(digest.len(), "key:".len() + 16, "{digest}");
        assert!(
            digest[4..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{digest}"
        );
        assert!(!digest.contains("sk-123"), "{digest}");
        // Stable within a process, and with the same secret elsewhere.
        assert_eq!(ours.of(&key("Bearer sk-123"), None).unwrap(), digest);
        assert_eq!(ours.of(&key("Bearer  sk-123 "), None).unwrap(), digest);
        assert_eq!(
            Tenants::new(true, SECRET)
                .of(&key("Bearer sk-123"), None)
                .unwrap(),
            digest
        );
        // Different for another key, another secret, or a random secret.
        assert_ne!(ours.of(&key("Bearer sk-124"), None).unwrap(), digest);
        let other = Tenants::new(false, b"another secret of sixteen bytes");
        assert_ne!(other.of(&key("Bearer sk-123"), None).unwrap(), digest);
        let random = Tenants::with_random_secret(false).unwrap();
        assert_ne!(random.of(&key("Bearer sk-123"), None).unwrap(), digest);
        // No key: the anonymous tenant.
        assert_eq!(ours.of(&key("Bearer "), None).unwrap(), "");
    }

    #[test]
    fn the_digest_is_hmac_sha256() {
        // RFC 4231, test case 2: the first 64 bits of HMAC-SHA-256("Jefe",
        // "what do ya want for nothing?").
        let tenants = Tenants::new(false, b"Jefe");
        let h = request(&[("authorization", "Bearer what do ya want for nothing?")]);
        assert_eq!(tenants.of(&h, None).unwrap(), "key:5bdcc146bf60754e");
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let shown = format!("{:?}", Tenants::new(true, SECRET));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("trust_claims: true"), "{shown}");
    }
}
