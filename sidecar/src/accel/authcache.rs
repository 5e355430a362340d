//! Authorization entries (DESIGN §3): what the primary showed one client for one repository.
//!
//! Key: SHA-256 over every credential-bearing request header (name and value), plus the client
//! address for anonymous clients, so a second client (other credentials, or anonymous from
//! another address) never rides on the first one's entry. Value: the tips the primary
//! advertised, and when. Entries are short-lived: `ttl` while the primary is reachable,
//! `max_staleness` while it is not.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Headers that carry credentials (plus configured extras).
pub const CREDENTIAL_HEADERS: &[&str] = &["authorization", "cookie", "private-token", "job-token"];

/// Identifies one client's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey([u8; 32]);

/// Computes the client key of a request.
pub fn client_key(headers: &HeaderMap, extra_headers: &[String], client: IpAddr) -> ClientKey {
    let mut h = Sha256::new();
    let mut any = false;
    let names = CREDENTIAL_HEADERS
        .iter()
        .copied()
        .chain(extra_headers.iter().map(String::as_str));
    for name in names {
        for v in headers.get_all(name) {
            any = true;
            h.update(name.to_ascii_lowercase().as_bytes());
            h.update(b"\0");
            h.update(v.as_bytes());
            h.update(b"\0");
        }
    }
    if !any {
        h.update(b"anonymous\0");
        h.update(client.to_string().as_bytes());
    }
    ClientKey(h.finalize().into())
}

/// What the primary advertised to one client for one repository.
#[derive(Clone, Debug)]
pub struct Entry {
    pub tips: HashSet<String>,
    pub confirmed_at: Instant,
    /// The primary's exact `info/refs` response (v0/v1 refs, or the v2 capabilities),
    /// replayed while the primary is down.
    pub advertisement: Option<bytes::Bytes>,
    /// The last v2 `ls-refs` exchange (request digest, response), replayed while the primary is down.
    pub ls_refs: Option<([u8; 32], bytes::Bytes)>,
}

/// The cache.
pub struct AuthCache {
    ttl: Duration,
    max_staleness: Duration,
    entries: Mutex<HashMap<(ClientKey, String, String), Entry>>,
}

const MAX_ENTRIES: usize = 100_000;

impl AuthCache {
    pub fn new(ttl: Duration, max_staleness: Duration) -> Self {
        AuthCache {
            ttl,
            max_staleness: max_staleness.max(ttl),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Records (replaces) the tips the primary just advertised.
    pub fn record(
        &self,
        key: ClientKey,
        replicable: &str,
        item: &str,
        tips: HashSet<String>,
        advertisement: Option<bytes::Bytes>,
    ) {
        let mut map = self.entries.lock().expect("auth cache");
        if map.len() >= MAX_ENTRIES {
            let horizon = self.max_staleness;
            map.retain(|_, e| e.confirmed_at.elapsed() < horizon);
        }
        map.insert(
            (key, replicable.to_string(), item.to_string()),
            Entry {
                tips,
                confirmed_at: Instant::now(),
                advertisement,
                ls_refs: None,
            },
        );
    }

    /// Keeps a v2 capability advertisement without touching the tips.
    pub fn record_v2_caps(
        &self,
        key: ClientKey,
        replicable: &str,
        item: &str,
        advertisement: bytes::Bytes,
    ) {
        let mut map = self.entries.lock().expect("auth cache");
        let e = map
            .entry((key, replicable.to_string(), item.to_string()))
            .or_insert_with(|| Entry {
                tips: HashSet::new(),
                confirmed_at: Instant::now(),
                advertisement: None,
                ls_refs: None,
            });
        e.advertisement = Some(advertisement);
    }

    /// Records the tips of a v2 `ls-refs` answer (replacing earlier tips: the primary's answer
    /// is the whole truth for this client now) with the exchange for replay.
    pub fn record_ls_refs(
        &self,
        key: ClientKey,
        replicable: &str,
        item: &str,
        tips: HashSet<String>,
        request: [u8; 32],
        response: bytes::Bytes,
    ) {
        let mut map = self.entries.lock().expect("auth cache");
        let e = map
            .entry((key, replicable.to_string(), item.to_string()))
            .or_insert_with(|| Entry {
                tips: HashSet::new(),
                confirmed_at: Instant::now(),
                advertisement: None,
                ls_refs: None,
            });
        e.tips = tips;
        e.confirmed_at = Instant::now();
        e.ls_refs = Some((request, response));
    }

    /// The entry if it is younger than the TTL (primary reachable) or `maxStaleness` (primary down).
    pub fn get(
        &self,
        key: ClientKey,
        replicable: &str,
        item: &str,
        primary_down: bool,
    ) -> Option<Entry> {
        let limit = if primary_down {
            self.max_staleness
        } else {
            self.ttl
        };
        let map = self.entries.lock().expect("auth cache");
        map.get(&(key, replicable.to_string(), item.to_string()))
            .filter(|e| e.confirmed_at.elapsed() < limit)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("auth cache").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_clients() {
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let anon = HeaderMap::new();
        assert_ne!(client_key(&anon, &[], ip1), client_key(&anon, &[], ip2));
        let mut alice = HeaderMap::new();
        alice.insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
        let mut bob = HeaderMap::new();
        bob.insert("authorization", "Basic Ym9iOnB3".parse().unwrap());
        assert_ne!(client_key(&alice, &[], ip1), client_key(&bob, &[], ip1));
        // Same credentials from another address: same client.
        assert_eq!(client_key(&alice, &[], ip1), client_key(&alice, &[], ip2));
        let mut custom = HeaderMap::new();
        custom.insert("x-forge-session", "s1".parse().unwrap());
        assert_ne!(
            client_key(&custom, &["x-forge-session".into()], ip1),
            client_key(&anon, &[], ip1)
        );
    }

    #[test]
    fn ttl_and_staleness() {
        let c = AuthCache::new(Duration::from_millis(0), Duration::from_secs(60));
        let k = client_key(&HeaderMap::new(), &[], "127.0.0.1".parse().unwrap());
        c.record(
            k,
            "repos",
            "a.git",
            ["x".repeat(40)].into_iter().collect(),
            None,
        );
        assert!(
            c.get(k, "repos", "a.git", false).is_none(),
            "expired while the primary is up"
        );
        assert!(
            c.get(k, "repos", "a.git", true).is_some(),
            "kept for maxStaleness while it is down"
        );
        assert!(c.get(k, "repos", "b.git", true).is_none());
    }
}
