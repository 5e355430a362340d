//! Shared set-up of the replication tests: a real primary sidecar (embedded forge) and a real
//! secondary sidecar trusting each other, plus a scripted fake primary for protocol edge cases
//! (FILE_NOT_FOUND, 409, 410, log_id changes, events arriving mid-sync).

#![allow(dead_code)]

use geoforge_crds::auth::{Scope, SigningKey, TokenData};
use geoforge_crds::wire::StatusReport;
use geoforge_tests::{SiteKey, site_key, wait_until};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Keys of a primary and a secondary site, each trusting the other.
pub struct Keys {
    pub primary: SiteKey,
    pub secondary: SiteKey,
}

pub fn keys(dir: &Path) -> Keys {
    Keys {
        primary: site_key(dir, "primary"),
        secondary: site_key(dir, "secondary"),
    }
}

pub const REPLICABLES: &str = r#"
replicables:
  - { name: repos, type: repository, sourcePath: repositories, include: ["**/*.git"], verificationInterval: VERIFY, concurrency: 4 }
  - { name: blobs, type: blob, sourcePath: blobs, include: ["**"], verificationInterval: VERIFY, concurrency: 8 }
"#;

/// Config of the primary (embedded forge, storage under `dir/p-storage`).
pub fn primary_yaml(dir: &Path, k: &Keys, extra_geo: &str) -> String {
    format!(
        r#"siteId: primary
role: primary
externalUrl: "http://127.0.0.1"
allowInsecure: true
stateDir: "{state}"
storageRoot: "{storage}"
forge: {{ embedded: {{ anonymousRead: true }} }}
keys:
  kid: primary.1
  privateKeyFile: "{pk}"
  trusted:
    - {{ kid: secondary.1, publicKey: "{spub}" }}
geo: {{ rescanInterval: 500ms, deleteMin: 1000 {extra_geo} }}
{reps}"#,
        state = dir.join("p-state").display(),
        storage = dir.join("p-storage").display(),
        pk = k.primary.file.display(),
        spub = k.secondary.public,
        reps = REPLICABLES.replace("VERIFY", "24h"),
    )
}

/// Config of the secondary pointing at `primary_url`.
pub fn secondary_yaml(dir: &Path, k: &Keys, primary_url: &str, extra: &str) -> String {
    secondary_yaml_v(dir, k, primary_url, extra, "24h", "")
}

pub fn secondary_yaml_v(
    dir: &Path,
    k: &Keys,
    primary_url: &str,
    extra: &str,
    verify: &str,
    extra_geo: &str,
) -> String {
    format!(
        r#"siteId: secondary
role: secondary
externalUrl: "http://127.0.0.1"
allowInsecure: true
stateDir: "{state}"
storageRoot: "{storage}"
primary: {{ staticUrl: "{primary_url}" }}
keys:
  kid: secondary.1
  privateKeyFile: "{sk}"
  trusted:
    - {{ kid: primary.1, publicKey: "{ppub}" }}
geo: {{ statusInterval: 1s, maxLongPoll: 2s {extra_geo} }}
{extra}
{reps}"#,
        state = dir.join("s-state").display(),
        storage = dir.join("s-storage").display(),
        sk = k.secondary.file.display(),
        ppub = k.primary.public,
        reps = REPLICABLES.replace("VERIFY", verify),
    )
}

pub fn p_repos(dir: &Path) -> PathBuf {
    dir.join("p-storage/repositories")
}
pub fn p_blobs(dir: &Path) -> PathBuf {
    dir.join("p-storage/blobs")
}
pub fn s_repos(dir: &Path) -> PathBuf {
    dir.join("s-storage/repositories")
}
pub fn s_blobs(dir: &Path) -> PathBuf {
    dir.join("s-storage/blobs")
}

/// Writes a blob atomically (temp + rename) so a rescan never reads half a file.
pub fn write_blob(root: &Path, id: &str, content: &[u8]) {
    let p = root.join(id);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let tmp = p.with_file_name(format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

pub fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The repository checksum of DESIGN §6, computed with the test's own git.
pub fn repo_checksum(repo: &Path) -> Option<String> {
    let out = geoforge_tests::git_cmd(repo)
        .args([
            "-c",
            "safe.directory=*",
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "refs/",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut lines: Vec<&[u8]> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort_unstable();
    let mut h = Sha256::new();
    for l in lines {
        h.update(l);
        h.update(b"\n");
    }
    Some(hex::encode(h.finalize()))
}

/// Minimal HTTP/1.0 request (no chunking); returns (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).ok()?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, buf[end + 4..].to_vec()))
}

/// An admin-scope token for `site`, signed with its own key.
pub fn admin_auth(key: &SiteKey, site: &str) -> String {
    let k = SigningKey::from_pem_file(&key.kid, &key.file).unwrap();
    k.authorization(site, &TokenData::scope(Scope::Admin))
}

/// The secondary's `/-/geo/status`.
pub fn status(admin_port: u16, key: &SiteKey) -> Option<StatusReport> {
    let auth = admin_auth(key, "secondary");
    let (code, body) = http(
        &format!("127.0.0.1:{admin_port}"),
        "GET",
        "/-/geo/status",
        &[("Authorization", &auth)],
        b"",
    )?;
    if code != 200 {
        return None;
    }
    serde_json::from_slice(&body).ok()
}

pub fn rep<'a>(s: &'a StatusReport, name: &str) -> &'a geoforge_crds::wire::ReplicableReport {
    s.replicables
        .iter()
        .find(|r| r.replicable == name)
        .expect("replicable in status")
}

/// Waits until the secondary reports `synced == total == n` (and nothing pending/failed) for
/// `replicable`.
pub fn wait_synced(admin: u16, key: &SiteKey, replicable: &str, n: i64, timeout: Duration) {
    wait_until(timeout, &format!("{replicable}: {n} synced"), || {
        let s = status(admin, key)?;
        let r = rep(&s, replicable);
        (r.total == n && r.synced == n).then_some(())
    });
}

/// Reads a row of the secondary's registry (read-only, beside the running process).
pub fn registry_row(dir: &Path, replicable: &str, id: &str) -> Option<(i64, Option<String>)> {
    let c = rusqlite::Connection::open_with_flags(
        dir.join("s-state/registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    c.busy_timeout(Duration::from_secs(5)).ok()?;
    c.query_row(
        "SELECT state, primary_checksum FROM registry WHERE replicable = ?1 AND item_id = ?2",
        rusqlite::params![replicable, id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

/// One column of a registry row, as text.
pub fn registry_text(dir: &Path, sql: &str) -> Option<String> {
    let c = rusqlite::Connection::open_with_flags(
        dir.join("s-state/registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    c.busy_timeout(Duration::from_secs(5)).ok()?;
    c.query_row(sql, [], |r| r.get::<_, Option<String>>(0))
        .ok()
        .flatten()
}

/// Pushes one new commit to a bare repository on the primary's disk (as a push through the
/// forge would leave it).
pub fn commit_to(bare: &Path, msg: &str) {
    let work = tempfile::tempdir().unwrap();
    geoforge_tests::git(work.path(), &["clone", "-q", bare.to_str().unwrap(), "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("file.txt"), format!("{msg}\n")).unwrap();
    geoforge_tests::git(&w, &["add", "file.txt"]);
    geoforge_tests::git(&w, &["commit", "-q", "-m", msg]);
    geoforge_tests::git(&w, &["push", "-q", "origin", "HEAD:main"]);
}

// ---- scripted fake primary ------------------------------------------------------------------

pub mod fake {
    use geoforge_crds::wire::{
        CatalogItem, CatalogPage, EventKind, EventsGone, EventsPage, GeoEvent,
    };
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// What the fake serves.
    #[derive(Default)]
    pub struct State {
        pub log_id: String,
        pub events: Vec<GeoEvent>,
        /// Cursors below this get 410.
        pub oldest_id: i64,
        /// blob id → content (served for the `blobs` replicable).
        pub blobs: BTreeMap<String, Vec<u8>>,
        /// Retrievable but not listed in the catalog (only events name them).
        pub unlisted: Vec<String>,
        /// Listed in the catalog but missing on "disk" (→ 404 FILE_NOT_FOUND).
        pub missing: Vec<String>,
        /// Retrieve requests seen: (id, checksum asked for, status answered).
        pub retrieves: Vec<(String, String, u16)>,
        /// Catalog requests seen.
        pub catalog_requests: usize,
        /// Status reports received.
        pub status_reports: usize,
        /// Retrieves of (id, checksum) block until `gate_open`, then get this content.
        pub gate: Option<(String, String, Vec<u8>)>,
        pub gate_open: bool,
        pub gate_waiting: bool,
        /// Geo-Api-Version sent.
        pub version: String,
    }

    pub struct Fake {
        pub state: Arc<(Mutex<State>, Condvar)>,
        pub port: u16,
    }

    impl Fake {
        pub fn start() -> Fake {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let state = Arc::new((
                Mutex::new(State {
                    log_id: "log-1".into(),
                    version: "1.0".into(),
                    ..Default::default()
                }),
                Condvar::new(),
            ));
            let st = state.clone();
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &st);
                    });
                }
            });
            Fake { state, port }
        }

        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
            let mut g = self.state.0.lock().unwrap();
            let v = f(&mut g);
            self.state.1.notify_all();
            v
        }

        /// Adds an event (id = next).
        pub fn event(&self, kind: EventKind, id: &str, checksum: Option<String>) -> i64 {
            self.with(|s| {
                let n = s.events.last().map(|e| e.id).unwrap_or(s.oldest_id.max(0)) + 1;
                s.events.push(GeoEvent {
                    id: n,
                    replicable: "blobs".into(),
                    item_id: id.into(),
                    event: kind,
                    checksum,
                    at: chrono::Utc::now(),
                });
                n
            })
        }
    }

    fn token_checksum(auth: &str) -> Option<String> {
        use base64::Engine;
        let jwt = auth.split_once(':')?.1;
        let payload = jwt.split('.').nth(1)?;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()?,
        )
        .ok()?;
        let data: serde_json::Value = serde_json::from_str(claims["data"].as_str()?).ok()?;
        Some(data["checksum"].as_str()?.to_string())
    }

    fn respond(mut c: &TcpStream, status: u16, version: &str, body: &[u8]) -> std::io::Result<()> {
        write!(
            c,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nGeo-Api-Version: {version}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        c.write_all(body)?;
        c.flush()
    }

    fn serve(conn: TcpStream, st: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut r = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut auth = String::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    auth = v.trim().to_string();
                }
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let q = |k: &str| -> Option<String> {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        };
        let (lock, cv) = &**st;
        let version = lock.lock().unwrap().version.clone();
        if method == "POST" && path == "/api/v4/geo/status" {
            lock.lock().unwrap().status_reports += 1;
            return respond(&conn, 200, &version, b"{}");
        }
        if path == "/api/v4/geo/events" {
            let after: i64 = q("after").and_then(|v| v.parse().ok()).unwrap_or(0);
            let wait: u64 = q("wait").and_then(|v| v.parse().ok()).unwrap_or(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(wait.min(2));
            let mut g = lock.lock().unwrap();
            loop {
                let last = g.events.last().map(|e| e.id).unwrap_or(g.oldest_id);
                if after < g.oldest_id {
                    let b = serde_json::to_vec(&EventsGone {
                        log_id: g.log_id.clone(),
                        oldest_id: g.oldest_id,
                        last_event_id: last,
                    })
                    .unwrap();
                    drop(g);
                    return respond(&conn, 410, &version, &b);
                }
                let evs: Vec<GeoEvent> =
                    g.events.iter().filter(|e| e.id > after).cloned().collect();
                if !evs.is_empty() || std::time::Instant::now() >= deadline {
                    let b = serde_json::to_vec(&EventsPage {
                        log_id: g.log_id.clone(),
                        events: evs,
                        last_event_id: last,
                    })
                    .unwrap();
                    drop(g);
                    return respond(&conn, 200, &version, &b);
                }
                g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
            }
        }
        if let Some(rest) = path.strip_prefix("/api/v4/geo/replicables/") {
            let mut g = lock.lock().unwrap();
            g.catalog_requests += 1;
            let items = if rest == "blobs" {
                g.blobs
                    .iter()
                    .filter(|(id, _)| !g.unlisted.contains(id))
                    .map(|(id, c)| CatalogItem {
                        id: id.clone(),
                        size: c.len() as u64,
                        checksum: super::sha256(c),
                        updated_at: chrono::Utc::now(),
                    })
                    .collect()
            } else {
                vec![]
            };
            let b = serde_json::to_vec(&CatalogPage {
                replicable: rest.into(),
                total: g.blobs.len() as u64,
                items,
                next_cursor: None,
            })
            .unwrap();
            drop(g);
            return respond(&conn, 200, &version, &b);
        }
        if let Some(rest) = path.strip_prefix("/api/v4/geo/retrieve/blobs/") {
            let id = percent_decode(rest);
            let asked = token_checksum(&auth).unwrap_or_default();
            let mut g = lock.lock().unwrap();
            let gated = g
                .gate
                .as_ref()
                .is_some_and(|(gid, gsum, _)| *gid == id && *gsum == asked);
            if gated {
                g.gate_waiting = true;
                cv.notify_all();
                while !g.gate_open {
                    g = cv.wait(g).unwrap();
                }
                let content = g.gate.as_ref().unwrap().2.clone();
                g.retrieves.push((id, asked, 200));
                drop(g);
                return respond(&conn, 200, &version, &content);
            }
            let (status, body): (u16, Vec<u8>) = if g.missing.contains(&id) {
                (
                    404,
                    br#"{"message":"file not found","geo_code":"FILE_NOT_FOUND"}"#.to_vec(),
                )
            } else {
                match g.blobs.get(&id) {
                    None => (
                        404,
                        br#"{"message":"not in the catalog","geo_code":"NOT_IN_CATALOG"}"#.to_vec(),
                    ),
                    Some(c) if super::sha256(c) != asked => (
                        409,
                        serde_json::to_vec(
                            &serde_json::json!({"current_checksum": super::sha256(c)}),
                        )
                        .unwrap(),
                    ),
                    Some(c) => (200, c.clone()),
                }
            };
            g.retrieves.push((id, asked, status));
            drop(g);
            return respond(&conn, status, &version, &body);
        }
        respond(&conn, 404, &version, b"{\"message\":\"no route\"}")
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }

    #[allow(unused_imports)]
    pub use EventKind::{Created, Deleted, Updated};
}
