//! Header hygiene on the request path (DESIGN §2, §3): ingress stripping, hop-by-hop removal,
//! the forwarding headers, and the response rewrites of separate-URL setups.

use geoforge_crds::auth::{PROXY_EXTRA_DATA_HEADER, PROXY_HEADER};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use ipnet::IpNet;
use std::net::IpAddr;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the legacy
/// `Proxy-Connection` and `Keep-Alive`, as lower-case bytes (for heads not parsed into names).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

/// `name` is one of [`HOP_BY_HOP`]. (Compared as names, not strings: the standard ones are an
/// enum compare each.)
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// `bytes` equals `lower` without regard to ASCII case, for a `lower` of lower-case letters,
/// digits and `-` (a header name or token looked for) and `bytes` without control characters
/// (httparse leaves none in names, nor in values but tab). Eight bytes at a time: OR-ing 0x20
/// lowers a letter and leaves a digit or `-` as it is (only control characters would turn
/// into one). `eq_ignore_ascii_case`, a byte at a time, was a tenth of a response head's parse.
#[inline]
pub fn eq_lower(bytes: &[u8], lower: &[u8]) -> bool {
    if bytes.len() != lower.len() {
        return false;
    }
    let (mut a, mut b) = (bytes.chunks_exact(8), lower.chunks_exact(8));
    for (x, y) in (&mut a).zip(&mut b) {
        let x = u64::from_ne_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_ne_bytes(y.try_into().expect("8 bytes"));
        if x | 0x2020_2020_2020_2020 != y {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(&x, &y)| x | 0x20 == y)
}

/// Maps with at most this many names are searched by a scan ([`find`]).
const SCAN_MAX: usize = 8;

/// `h.get(name)`, found by comparing names in a small map: most requests carry a handful of
/// headers, and hashing the name looked for (a custom one byte by byte) and probing cost more
/// than comparing it with each (a standard name is compared as a number).
pub fn find<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if h.keys_len() <= SCAN_MAX {
        h.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    } else {
        h.get(name)
    }
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The forwarding headers a client may only set through a trusted proxy.
fn is_forwarding(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-forwarded-port"
            | "forwarded"
    )
}

/// Removes every header `pred` selects. Most messages carry none or one or two (a response's
/// `Connection: keep-alive`): one scan of the names collects up to four without allocating,
/// and the map is only touched when one matched.
fn remove_matching(h: &mut HeaderMap, pred: impl Fn(&HeaderName) -> bool) {
    loop {
        let mut found: [Option<HeaderName>; 4] = Default::default();
        let mut n = 0;
        for name in h.keys().filter(|k| pred(k)) {
            if n == found.len() {
                break;
            }
            found[n] = Some(name.clone());
            n += 1;
        }
        for name in found.iter_mut().take(n).filter_map(Option::take) {
            h.remove(name);
        }
        // a full batch may have left more: scan again
        if n < found.len() {
            return;
        }
    }
}

/// Whether `name` is one of the Geo proxy headers (`Gitlab-Workhorse-Geo-Proxy*`).
pub fn is_geo_header(name: &HeaderName) -> bool {
    name.as_str().starts_with(PROXY_HEADER)
}

/// Removes every `Gitlab-Workhorse-Geo-Proxy*` header.
pub fn strip_geo_headers(h: &mut HeaderMap) {
    remove_matching(h, is_geo_header);
}

/// Removes `X-Forwarded-*` and `Forwarded`.
pub fn strip_forwarding(h: &mut HeaderMap) {
    remove_matching(h, is_forwarding);
}

/// The extra-data header value (`<kid>:<JWT>`), if exactly one was sent.
pub fn extra_data(h: &HeaderMap) -> Option<&str> {
    let mut it = h.get_all(PROXY_EXTRA_DATA_HEADER).iter();
    let first = it.next()?;
    if it.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// Parsed `trustedProxies`.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (a bare address means that one host).
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        let mut out = vec![];
        for s in list {
            let net = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("trustedProxies: {s:?} is not a CIDR or address"))?;
            out.push(net);
        }
        Ok(TrustedProxies(out))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client address behind a trusted proxy: walk `X-Forwarded-For` from the right and take
/// the first address that is not itself a trusted proxy (nginx `real_ip_recursive`).
pub fn client_behind_trusted(h: &HeaderMap, trusted: &TrustedProxies) -> Option<IpAddr> {
    let all: Vec<IpAddr> = forwarded_for(h);
    all.iter()
        .rev()
        .find(|ip| !trusted.contains(**ip))
        .or(all.first())
        .copied()
}

/// The last `X-Forwarded-For` address (what a verified secondary saw as its peer).
pub fn last_forwarded_for(h: &HeaderMap) -> Option<IpAddr> {
    forwarded_for(h).last().copied()
}

fn forwarded_for(h: &HeaderMap) -> Vec<IpAddr> {
    h.get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect()
}

/// The other headers a `Connection` header names as hop-by-hop (usually none: it names only
/// `keep-alive`, `close` or `upgrade`, which are hop-by-hop anyway, and nothing is allocated).
pub fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    if find(h, &header::CONNECTION).is_none() {
        return Vec::new();
    }
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| connection_tokens(v.as_bytes()))
        .filter_map(named_by_connection)
        .collect()
}

/// The tokens of one `Connection` value, trimmed, empty ones left out.
pub fn connection_tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&c| c == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The header a `Connection` token names as hop-by-hop: none for `keep-alive`, `close`,
/// `upgrade` and the hop-by-hop headers themselves.
pub fn named_by_connection(token: &[u8]) -> Option<HeaderName> {
    if [&b"keep-alive"[..], b"close", b"upgrade"]
        .iter()
        .any(|k| eq_lower(token, k))
    {
        return None;
    }
    HeaderName::from_bytes(token)
        .ok()
        .filter(|n| !is_hop_by_hop(n))
}

/// The `Upgrade` protocol of a request that asks to switch protocols (e.g. `websocket`).
pub fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    // most requests have no `Upgrade`: one lookup, and `Connection` is not parsed
    let proto = find(h, &header::UPGRADE)?;
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| connection_tokens(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
        .then(|| proto.clone())
}

/// What the forwarding headers say about the original request.
pub struct ForwardInfo<'a> {
    /// The immediate peer of this hop.
    pub peer: IpAddr,
    /// The `Host` the client used.
    pub host: Option<&'a HeaderValue>,
    /// `http` (this port does not terminate TLS) unless a trusted hop said otherwise.
    pub proto: &'a str,
}

/// This hop's forwarding headers. They are written straight into the upstream request head
/// ([`crate::proxy::h1::RequestHead::encode`]) rather than inserted into the request's map
/// first, which cost four map insertions per proxied request; this hop's values are reused
/// from the previous request on the thread when they are the same (see [`hop_values`]).
pub struct Forwarding {
    xff: HeaderValue,
    forwarded: HeaderValue,
    host: Option<HeaderValue>,
    proto: HeaderValue,
}

impl Forwarding {
    pub fn new(info: &ForwardInfo<'_>) -> Forwarding {
        let (xff, forwarded) = hop_values(canonical(info.peer), info.host, info.proto);
        Forwarding {
            xff,
            forwarded,
            host: info.host.cloned(),
            proto: match info.proto {
                "http" => HeaderValue::from_static("http"),
                "https" => HeaderValue::from_static("https"),
                other => HeaderValue::from_str(other).unwrap_or(HeaderValue::from_static("http")),
            },
        }
    }

    /// The client's headers that [`Forwarding::write`] writes anew (the head writer leaves
    /// them out).
    pub fn replaces(name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || *name == header::FORWARDED
            || *name == X_FORWARDED_HOST
            || *name == X_FORWARDED_PROTO
    }

    /// Writes `X-Forwarded-For` and `Forwarded` as the client's values (only a trusted hop's
    /// survive ingress) followed by this hop's, and `X-Forwarded-Host` / `-Proto` as a trusted
    /// hop set them, or else this hop's. `seen`: the client's headers hold any of them at all
    /// (most hold none, and then nothing is looked up).
    pub fn write(&self, client: &HeaderMap, seen: bool, out: &mut Vec<u8>) {
        let joined = |out: &mut Vec<u8>, name: &HeaderName, ours: &HeaderValue| {
            push_name(out, name);
            if seen {
                for prev in client.get_all(name) {
                    let prev = prev.as_bytes().trim_ascii();
                    if !prev.is_empty() {
                        out.extend_from_slice(prev);
                        out.extend_from_slice(b", ");
                    }
                }
            }
            push_value(out, ours.as_bytes());
        };
        joined(out, &X_FORWARDED_FOR, &self.xff);
        joined(out, &header::FORWARDED, &self.forwarded);
        let theirs = |name| seen.then(|| client.get(name)).flatten();
        if let Some(host) = theirs(X_FORWARDED_HOST).or(self.host.as_ref()) {
            push_line(out, &X_FORWARDED_HOST, host.as_bytes());
        }
        let proto = theirs(X_FORWARDED_PROTO).unwrap_or(&self.proto);
        push_line(out, &X_FORWARDED_PROTO, proto.as_bytes());
    }
}

/// Writes one `name: value` head line.
pub fn push_line(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    push_name(out, name);
    push_value(out, value);
}

fn push_name(out: &mut Vec<u8>, name: &HeaderName) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
}

fn push_value(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

/// This hop's `X-Forwarded-For` and `Forwarded` elements, and what they were built from.
struct HopValues {
    peer: IpAddr,
    host: Option<HeaderValue>,
    proto: String,
    xff: HeaderValue,
    forwarded: HeaderValue,
}

thread_local! {
    /// The last hop values built on this thread. Consecutive requests mostly share them (the
    /// peer is the client's connection or the ingress in front of the site, and the `Host`
    /// is the site's): reused, they cost a comparison instead of two strings to write and
    /// check.
    static LAST_HOP: std::cell::RefCell<Option<HopValues>> = const { std::cell::RefCell::new(None) };
}

/// This hop's `X-Forwarded-For` and `Forwarded` elements (only the two values are cloned on a
/// reuse: each a reference count).
fn hop_values(peer: IpAddr, host: Option<&HeaderValue>, proto: &str) -> (HeaderValue, HeaderValue) {
    LAST_HOP.with_borrow_mut(|last| {
        if let Some(v) = last.as_ref()
            && v.peer == peer
            && v.proto == proto
            && v.host.as_ref().map(HeaderValue::as_bytes) == host.map(HeaderValue::as_bytes)
        {
            return (v.xff.clone(), v.forwarded.clone());
        }
        let mut xff = String::with_capacity(40);
        push_ip(&mut xff, peer);
        // RFC 7239: an IPv6 node is quoted and bracketed
        let mut fwd = String::with_capacity(96);
        let (open, close) = if peer.is_ipv6() {
            ("for=\"[", "]\"")
        } else {
            ("for=", "")
        };
        fwd.push_str(open);
        fwd.push_str(&xff);
        fwd.push_str(close);
        fwd.push_str(";proto=");
        fwd.push_str(proto);
        if let Some(host) = host.and_then(|v| v.to_str().ok())
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c))
        {
            fwd.push_str(";host=\"");
            fwd.push_str(host);
            fwd.push('"');
        }
        let v = HopValues {
            peer,
            host: host.cloned(),
            proto: proto.to_string(),
            xff: HeaderValue::from_str(&xff).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded: HeaderValue::from_str(&fwd)
                .unwrap_or(HeaderValue::from_static("for=unknown")),
        };
        let values = (v.xff.clone(), v.forwarded.clone());
        *last = Some(v);
        values
    })
}

/// Writes an address as `Display` does; IPv4 by hand, as the formatter is a measurable share
/// of a proxied request.
fn push_ip(b: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    b.push('.');
                }
                if o >= 100 {
                    b.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    b.push(char::from(b'0' + o / 10 % 10));
                }
                b.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(a) => {
            use std::fmt::Write;
            let _ = write!(b, "{a}");
        }
    }
}

/// Rewrites `Location`/`Refresh` values that point at one of `from` (URL prefixes such as the
/// primary's internal and external URLs) to `to` (this site's external URL), and drops the
/// `Domain` attribute of `Set-Cookie` so cookies stay on the host the client used.
pub fn rewrite_response(h: &mut HeaderMap, from: &[String], to: &str) {
    let to = to.trim_end_matches('/');
    for name in [header::LOCATION, HeaderName::from_static("refresh")] {
        let Some(v) = h.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(new) = rewrite_url_in(v, from, to)
            && let Ok(nv) = HeaderValue::from_str(&new)
        {
            h.insert(name, nv);
        }
    }
    let cookies: Vec<HeaderValue> = h.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    h.remove(header::SET_COOKIE);
    for c in cookies {
        let new = match c.to_str() {
            Ok(s) => {
                let kept: Vec<&str> = s
                    .split(';')
                    .filter(|attr| {
                        !attr
                            .trim()
                            .get(..7)
                            .is_some_and(|p| p.eq_ignore_ascii_case("domain="))
                    })
                    .collect();
                HeaderValue::from_str(&kept.join(";")).unwrap_or(c)
            }
            Err(_) => c,
        };
        h.append(header::SET_COOKIE, new);
    }
}

/// Replaces the first occurrence of one of the `from` prefixes (at the start of the value or
/// after `url=` in a `Refresh` value) by `to`.
fn rewrite_url_in(value: &str, from: &[String], to: &str) -> Option<String> {
    let (head, url) = match value.to_ascii_lowercase().find("url=") {
        Some(i) => (&value[..i + 4], &value[i + 4..]),
        None => ("", value),
    };
    for f in from {
        let f = f.trim_end_matches('/');
        if f.is_empty() {
            continue;
        }
        if let Some(rest) = strip_prefix_ci(url, f)
            && (rest.is_empty() || rest.starts_with(['/', '?', '#']))
        {
            return Some(format!("{head}{to}{rest}"));
        }
    }
    None
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_scans_small_maps_and_hashes_large_ones() {
        for extra in [0, SCAN_MAX + 4] {
            let mut h = HeaderMap::new();
            for i in 0..extra {
                h.insert(
                    HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                    HeaderValue::from(i),
                );
            }
            h.append(header::HOST, HeaderValue::from_static("a"));
            h.append(X_REQUEST_ID, HeaderValue::from_static("id"));
            h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
            assert_eq!(find(&h, &header::HOST).unwrap(), "a", "{extra}");
            assert_eq!(find(&h, &X_REQUEST_ID).unwrap(), "id", "the first value");
            assert!(find(&h, &header::UPGRADE).is_none());
            assert!(find(&h, &X_FORWARDED_FOR).is_none());
            if extra > 0 {
                assert_eq!(find(&h, &HeaderName::from_static("x-3")).unwrap(), "3");
            }
        }
    }

    #[test]
    fn the_hop_by_hop_names_and_the_predicate_agree() {
        for n in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
        for n in ["content-length", "date", "x-te", "upgrades"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
    }

    #[test]
    fn eq_lower_ignores_case_only() {
        for (a, b, eq) in [
            ("Content-Length", "content-length", true),
            ("CONTENT-LENGTH", "content-length", true),
            ("content-lengtH", "content-length", true),
            ("content-lengths", "content-length", false),
            ("content_length", "content-length", false),
            ("Content-Lengtg", "content-length", false),
            ("date", "date", true),
            ("Datf", "date", false),
            ("", "", true),
            ("x-1", "x-1", true),
            ("x-2", "x-1", false),
            ("Keep-Alive", "keep-alive", true),
            ("keep~alive", "keep-alive", false),
        ] {
            assert_eq!(eq_lower(a.as_bytes(), b.as_bytes()), eq, "{a} {b}");
            assert_eq!(
                eq,
                a.eq_ignore_ascii_case(b),
                "the same answer as eq_ignore_ascii_case for {a}"
            );
        }
    }

    /// Hop-by-hop headers removed from a map, as the request head writer leaves them out
    /// ([`crate::proxy::h1::RequestHead::encode`]).
    fn remove_hop_by_hop(h: &mut HeaderMap) {
        for n in connection_named(h) {
            h.remove(n);
        }
        remove_matching(h, is_hop_by_hop);
    }

    /// The client's headers `h` as the upstream sees them: with this hop's forwarding headers
    /// written as the request head writer writes them.
    fn forwarded(h: &HeaderMap, info: ForwardInfo<'_>) -> HeaderMap {
        let mut out = Vec::new();
        let seen = h.keys().any(Forwarding::replaces);
        Forwarding::new(&info).write(h, seen, &mut out);
        let mut up: HeaderMap = h
            .iter()
            .filter(|(n, _)| !Forwarding::replaces(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for line in String::from_utf8(out).unwrap().split_terminator("\r\n") {
            let (n, v) = line.split_once(": ").unwrap();
            assert!(!up.contains_key(n), "{n} written once");
            up.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        up
    }

    #[test]
    fn location_and_refresh_rewritten() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            "http://primary.internal:8080/group/p.git/info/refs?x=1"
                .parse()
                .unwrap(),
        );
        h.insert(
            "refresh",
            "0; url=https://git.paris.example/x".parse().unwrap(),
        );
        h.append(
            header::SET_COOKIE,
            "a=b; Domain=paris.example; Path=/".parse().unwrap(),
        );
        let from = vec![
            "http://primary.internal:8080".to_string(),
            "https://git.paris.example/".to_string(),
        ];
        rewrite_response(&mut h, &from, "https://git.tokyo.example/");
        assert_eq!(
            h[header::LOCATION],
            "https://git.tokyo.example/group/p.git/info/refs?x=1"
        );
        assert_eq!(h["refresh"], "0; url=https://git.tokyo.example/x");
        assert_eq!(h[header::SET_COOKIE], "a=b; Path=/");
    }

    #[test]
    fn other_hosts_untouched() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            "http://primary.internal:80800/x".parse().unwrap(),
        );
        rewrite_response(
            &mut h,
            &["http://primary.internal:8080".into()],
            "https://t.example",
        );
        assert_eq!(h[header::LOCATION], "http://primary.internal:80800/x");
    }

    #[test]
    fn every_matching_header_is_removed_however_many() {
        let mut h = HeaderMap::new();
        for i in 0..11 {
            h.append(
                HeaderName::from_bytes(format!("gitlab-workhorse-geo-proxy-x{i}").as_bytes())
                    .unwrap(),
                HeaderValue::from_static("1"),
            );
            h.append("x-kept", HeaderValue::from_static("1"));
        }
        h.append("gitlab-workhorse-geo-proxy", HeaderValue::from_static("1"));
        strip_geo_headers(&mut h);
        assert_eq!(h.len(), 11);
        assert!(h.keys().all(|k| k == "x-kept"));
    }

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let ws = h(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocol(&ws).unwrap(), "websocket");
        assert!(upgrade_protocol(&h(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_protocol(&h(&[("connection", "upgrade")])).is_none());
        assert!(
            upgrade_protocol(&h(&[("connection", "keep-alive"), ("upgrade", "h2c")])).is_none()
        );
    }

    #[test]
    fn client_address_behind_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.1.1.1".parse().unwrap(),
        );
        assert_eq!(
            client_behind_trusted(&h, &t),
            Some("1.2.3.4".parse().unwrap())
        );
        assert!(t.contains("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn addresses_written_as_display_does() {
        for ip in [
            "0.0.0.0",
            "10.0.9.100",
            "255.255.255.255",
            "192.168.1.19",
            "::1",
            "fe80::2",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut b = String::new();
            push_ip(&mut b, ip);
            assert_eq!(b, ip.to_string());
        }
    }

    #[test]
    fn an_ipv6_hop_is_quoted_and_bracketed_in_forwarded() {
        let h = HeaderMap::new();
        let h = forwarded(
            &h,
            ForwardInfo {
                peer: "2001:db8::7".parse().unwrap(),
                host: None,
                proto: "https",
            },
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(h[header::FORWARDED], "for=\"[2001:db8::7]\";proto=https");
    }

    #[test]
    fn reused_hop_values_follow_the_peer_host_and_proto() {
        let cases = [
            ("10.0.0.1", Some("a.example"), "http"),
            ("10.0.0.1", Some("a.example"), "http"),
            ("10.0.0.2", Some("a.example"), "http"),
            ("10.0.0.2", Some("b.example"), "http"),
            ("10.0.0.2", None, "http"),
            ("10.0.0.2", None, "https"),
            ("10.0.0.1", Some("a.example"), "http"),
        ];
        for (peer, host, proto) in cases {
            let host = host.map(HeaderValue::from_static);
            let h = HeaderMap::new();
            let h = forwarded(
                &h,
                ForwardInfo {
                    peer: peer.parse().unwrap(),
                    host: host.as_ref(),
                    proto,
                },
            );
            assert_eq!(h["x-forwarded-for"], peer);
            let mut want = format!("for={peer};proto={proto}");
            if let Some(host) = &host {
                want.push_str(&format!(";host=\"{}\"", host.to_str().unwrap()));
            }
            assert_eq!(h[header::FORWARDED], want.as_str());
        }
    }

    #[test]
    fn forwarding_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        let h = forwarded(
            &h,
            ForwardInfo {
                peer: "127.0.0.1".parse().unwrap(),
                host: Some(&HeaderValue::from_static("git.example:8080")),
                proto: "http",
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "git.example:8080");
        assert_eq!(
            h[header::FORWARDED],
            "for=127.0.0.1;proto=http;host=\"git.example:8080\""
        );
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_trusted_hops_forwarding_headers_are_kept_and_extended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.append("x-forwarded-for", " 5.6.7.8 ".parse().unwrap());
        h.insert("forwarded", "for=1.2.3.4;proto=https".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-forwarded-host", "outer.example".parse().unwrap());
        h.insert("x-forwarded-port", "443".parse().unwrap());
        let h = forwarded(
            &h,
            ForwardInfo {
                peer: "10.0.0.9".parse().unwrap(),
                host: Some(&HeaderValue::from_static("inner.example")),
                proto: "http",
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(
            h[header::FORWARDED],
            "for=1.2.3.4;proto=https, for=10.0.0.9;proto=http;host=\"inner.example\""
        );
        assert_eq!(h["x-forwarded-proto"], "https", "the trusted hop's");
        assert_eq!(h["x-forwarded-host"], "outer.example", "the trusted hop's");
        assert_eq!(h["x-forwarded-port"], "443", "not ours to write: passed on");
    }
}
