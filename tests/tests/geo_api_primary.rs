//! The primary's Geo API (issue 4) against a real `geo-sidecar` process, real `git` and real
//! SQLite: token checks on every route, retrieve/409/404, path traversal, long-poll, catalog
//! pagination under inserts, durability across kill -9, pruning and 410, the delete guard,
//! hooks, and `git fetch` from the Geo repository endpoint.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use geoforge_crds::auth::{Claims, SigningKey, TokenData};
use geoforge_crds::wire::{CatalogPage, EventKind, EventsGone, EventsPage, StatusReport};
use geoforge_tests::{
    Sidecar, SiteKey, credentials_line, git, git_cmd, make_bare_repo, site_key, wait_until,
};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------- a tiny blocking HTTP/1.1 client (raw paths, no normalisation) ----------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad JSON ({e}) in {} {}", self.status, self.text()))
    }
}

fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = vec![];
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(
                std::str::from_utf8(&rest[..i])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim(),
                16,
            )
            .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest = &rest[i + 2 + n + 2..];
        }
        body = out;
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn get(port: u16, path: &str, auth: Option<&str>) -> Reply {
    match auth {
        Some(a) => request(port, "GET", path, &[("Authorization", a)], b""),
        None => request(port, "GET", path, &[], b""),
    }
}

// ---------- a primary with two peers ----------

struct Env {
    dir: tempfile::TempDir,
    paris: SiteKey,
    tokyo: SiteKey,
    berlin: SiteKey,
    yaml: String,
}

const HOOK_TOKEN: &str = "hook-secret-123";

impl Env {
    /// A primary `paris` trusting `tokyo` and `berlin`, with a repository replicable `repos`
    /// (`storage/repositories`) and a blob replicable `files` (`storage/files`).
    fn new(geo: &str) -> Env {
        let geo = if geo.is_empty() {
            "rescanInterval: 300ms"
        } else {
            geo
        };
        let dir = tempfile::tempdir().unwrap();
        let paris = site_key(dir.path(), "paris");
        let tokyo = site_key(dir.path(), "tokyo");
        let berlin = site_key(dir.path(), "berlin");
        let hook = dir.path().join("hook-token");
        write_secret(&hook, HOOK_TOKEN);
        let creds = dir.path().join("users");
        write_secret(&creds, &credentials_line("alice", "wonderland"));
        let yaml = format!(
            r#"siteId: paris
role: primary
externalUrl: "http://127.0.0.1"
allowInsecure: true
stateDir: "{state}"
storageRoot: "{storage}"
forge: {{ embedded: {{ anonymousRead: true, credentialsFile: "{creds}" }}, hookTokenFile: "{hook}" }}
keys:
  kid: paris.1
  privateKeyFile: "{pk}"
  trusted:
    - {{ kid: tokyo.1, publicKey: "{tokyo}" }}
    - {{ kid: berlin.1, publicKey: "{berlin}" }}
geo: {{ {geo} }}
replicables:
  - {{ name: repos, type: repository, sourcePath: repositories, include: ["**/*.git"] }}
  - {{ name: files, type: blob, sourcePath: files, include: ["**"] }}
"#,
            state = dir.path().join("state").display(),
            storage = dir.path().join("storage").display(),
            creds = creds.display(),
            hook = hook.display(),
            pk = paris.file.display(),
            tokyo = tokyo.public,
            berlin = berlin.public,
        );
        Env {
            dir,
            paris,
            tokyo,
            berlin,
            yaml,
        }
    }
    fn files(&self) -> PathBuf {
        self.dir.path().join("storage/files")
    }
    fn repos(&self) -> PathBuf {
        self.dir.path().join("storage/repositories")
    }
    fn start(&self) -> Sidecar {
        Sidecar::start(self.dir.path(), "paris", &self.yaml)
    }
    fn key(&self, k: &SiteKey) -> SigningKey {
        SigningKey::from_pem_file(&k.kid, &k.file).unwrap()
    }
    /// `Authorization` value signed by tokyo for paris.
    fn tokyo_auth(&self, data: &TokenData) -> String {
        self.key(&self.tokyo).authorization("paris", data)
    }
    fn admin_auth(&self) -> String {
        self.key(&self.paris).authorization(
            "paris",
            &TokenData::scope(geoforge_crds::auth::Scope::Admin),
        )
    }
    fn status(&self, s: &Sidecar) -> serde_json::Value {
        let r = get(s.admin, "/-/geo/status", Some(&self.admin_auth()));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
    fn events(&self, s: &Sidecar, after: i64, wait: u32) -> Reply {
        get(
            s.service,
            &format!("/api/v4/geo/events?after={after}&limit=1000&wait={wait}"),
            Some(&self.tokyo_auth(&TokenData::scope(geoforge_crds::auth::Scope::Events))),
        )
    }
    fn events_page(&self, s: &Sidecar, after: i64) -> EventsPage {
        let r = self.events(s, after, 0);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
    fn catalog(&self, s: &Sidecar, rep: &str, after: Option<&str>, limit: usize) -> CatalogPage {
        let q = match after {
            Some(a) => format!("?after={a}&limit={limit}"),
            None => format!("?limit={limit}"),
        };
        let r = get(
            s.service,
            &format!("/api/v4/geo/replicables/{rep}{q}"),
            Some(&self.tokyo_auth(&TokenData::catalog(rep))),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
    fn catalog_all(&self, s: &Sidecar, rep: &str) -> Vec<geoforge_crds::wire::CatalogItem> {
        let mut out = vec![];
        let mut after: Option<String> = None;
        loop {
            let p = self.catalog(s, rep, after.as_deref(), 1000);
            out.extend(p.items);
            match p.next_cursor {
                Some(c) => after = Some(c),
                None => return out,
            }
        }
    }
    fn wait_item(&self, s: &Sidecar, rep: &str, id: &str) -> geoforge_crds::wire::CatalogItem {
        wait_until(
            Duration::from_secs(30),
            &format!("{rep}/{id} catalogued"),
            || self.catalog_all(s, rep).into_iter().find(|i| i.id == id),
        )
    }
    fn hook(&self, s: &Sidecar, token: &str, body: &str) -> Reply {
        request(
            s.service,
            "POST",
            "/api/v4/geo/hooks",
            &[
                ("X-Gitlab-Token", token),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    }
}

fn write_secret(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    writeln!(f, "{content}").unwrap();
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn write_file(root: &Path, id: &str, content: &[u8]) {
    let p = root.join(id);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Signs arbitrary claims with an Ed25519 site key (for hostile tokens).
fn sign_claims(key: &SiteKey, kid_header: &str, claims: &serde_json::Value) -> String {
    let pem = std::fs::read_to_string(&key.file).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some(kid_header.to_string());
    jsonwebtoken::encode(&h, claims, &jsonwebtoken::EncodingKey::from_ed_der(&der)).unwrap()
}

fn claims(data: &TokenData, aud: &str, iat: i64, exp: i64) -> serde_json::Value {
    serde_json::to_value(Claims {
        data: serde_json::to_string(data).unwrap(),
        aud: aud.into(),
        jti: "t".into(),
        iat,
        nbf: Some(iat - 5),
        exp,
    })
    .unwrap()
}

// ---------- tests ----------

#[test]
fn geo_api_hostile_tokens_are_refused_and_nothing_streams() {
    let env = Env::new("");
    let secret = b"TOP-SECRET-BLOB-CONTENT".repeat(100);
    write_file(&env.files(), "a/secret.bin", &secret);
    write_file(&env.files(), "a/other.bin", b"other");
    let s = env.start();
    let item = env.wait_item(&s, "files", "a/secret.bin");
    let sum = sha256_hex(&secret);
    assert_eq!(item.checksum, sum);
    assert_eq!(item.size, secret.len() as u64);
    let path = "/api/v4/geo/retrieve/files/a%2Fsecret.bin";
    let good = TokenData::retrieve("files", "a/secret.bin", &sum);
    let now = unix_now();
    let tokyo = env.key(&env.tokyo);

    let tamper = |t: &str| -> String {
        let (kid, jwt) = t.trim_start_matches("GL-Geo ").split_once(':').unwrap();
        let mut parts: Vec<String> = jwt.split('.').map(String::from).collect();
        let c = claims(
            &TokenData::retrieve("files", "a/secret.bin", &sum),
            "paris",
            now,
            now + 30,
        );
        let mut c = c;
        c["jti"] = serde_json::json!("tampered");
        parts[1] = URL_SAFE_NO_PAD.encode(c.to_string());
        format!("GL-Geo {kid}:{}", parts.join("."))
    };
    let none_token = format!(
        "GL-Geo tokyo.1:{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"tokyo.1"}"#),
        URL_SAFE_NO_PAD.encode(claims(&good, "paris", now, now + 30).to_string())
    );
    let hs_with_pub = {
        let pubkey = URL_SAFE_NO_PAD.decode(&env.tokyo.public).unwrap();
        SigningKey::hs256("tokyo.1", &pubkey).authorization("paris", &good)
    };
    let hs_with_pub_text =
        SigningKey::hs256("tokyo.1", env.tokyo.public.as_bytes()).authorization("paris", &good);
    let signed =
        |c: serde_json::Value| format!("GL-Geo tokyo.1:{}", sign_claims(&env.tokyo, "tokyo.1", &c));
    let missing_claims = format!(
        "GL-Geo tokyo.1:{}",
        sign_claims(
            &env.tokyo,
            "tokyo.1",
            &serde_json::json!({"data": serde_json::to_string(&good).unwrap(), "aud": "paris"})
        )
    );
    let big = format!(
        "GL-Geo tokyo.1:{}",
        sign_claims(
            &env.tokyo,
            "tokyo.1",
            &serde_json::json!({"data": serde_json::to_string(&good).unwrap(), "aud": "paris",
                "jti": "x".repeat(9 * 1024), "iat": now, "exp": now + 30})
        )
    );
    let unknown_kid = {
        let g = geoforge_crds::auth::generate_key();
        SigningKey::from_pem("rome.1", &g.private_pem)
            .unwrap()
            .authorization("paris", &good)
    };
    // Signed by berlin's key but presented as tokyo's.
    let wrong_kid = format!(
        "GL-Geo tokyo.1:{}",
        sign_claims(
            &env.berlin,
            "tokyo.1",
            &claims(&good, "paris", now, now + 30)
        )
    );
    let cases: Vec<(&str, String)> = vec![
        ("no token", String::new()),
        ("garbage", "GL-Geo nonsense".into()),
        (
            "bearer scheme",
            format!(
                "Bearer {}",
                tokyo.mint("paris", &good, Duration::from_secs(30))
            ),
        ),
        ("alg none", none_token),
        ("HS256 with the public key bytes", hs_with_pub),
        ("HS256 with the public key text", hs_with_pub_text),
        (
            "expired",
            signed(claims(&good, "paris", now - 600, now - 570)),
        ),
        ("nbf in the future", {
            let mut c = claims(&good, "paris", now, now + 30);
            c["nbf"] = serde_json::json!(now + 3600);
            signed(c)
        }),
        (
            "iat in the future",
            signed(claims(&good, "paris", now + 3600, now + 3630)),
        ),
        ("unknown kid", unknown_kid),
        ("wrong kid (berlin's key as tokyo)", wrong_kid),
        ("tampered payload", tamper(&env.tokyo_auth(&good))),
        (
            "data naming another item",
            env.tokyo_auth(&TokenData::retrieve("files", "a/other.bin", &sum)),
        ),
        (
            "data naming another replicable",
            env.tokyo_auth(&TokenData::retrieve("repos", "a/secret.bin", &sum)),
        ),
        (
            "data without checksum",
            env.tokyo_auth(&TokenData {
                checksum: None,
                ..good.clone()
            }),
        ),
        ("missing claims", missing_claims),
        ("9 KiB token", big),
        (
            "1-hour validity",
            signed(claims(&good, "paris", now, now + 3600)),
        ),
        (
            "another scope",
            env.tokyo_auth(&TokenData::catalog("files")),
        ),
        ("aud another site", tokyo.authorization("berlin", &good)),
    ];
    for (what, auth) in &cases {
        let r = if auth.is_empty() {
            get(s.service, path, None)
        } else {
            get(s.service, path, Some(auth))
        };
        assert_eq!(r.status, 401, "{what}: {} {}", r.status, r.text());
        assert!(
            !r.body.windows(10).any(|w| w == b"TOP-SECRET"),
            "{what}: content leaked"
        );
        assert!(
            r.header("geo-api-version").is_some(),
            "{what}: no Geo-Api-Version"
        );
        assert!(
            !r.text().contains("secret.bin"),
            "{what}: reason names the item"
        );
        assert_eq!(r.text().lines().count(), 1, "{what}: one-line reason");
    }
    // The same 401 whether or not the item exists.
    let r = get(
        s.service,
        "/api/v4/geo/retrieve/files/does%2Fnot%2Fexist",
        Some(&env.tokyo_auth(&good)),
    );
    assert_eq!(r.status, 401);

    // Other routes refuse tokens of other scopes too.
    let ev = env.tokyo_auth(&TokenData::catalog("files"));
    for p in [
        "/api/v4/geo/events?after=0",
        "/api/v4/geo/sites",
        "/api/v4/geo/repositories/repos/x.git/info/refs?service=git-upload-pack",
    ] {
        assert_eq!(get(s.service, p, Some(&ev)).status, 401, "{p}");
    }
    let r = get(s.service, "/api/v4/geo/replicables/repos", Some(&ev));
    assert_eq!(r.status, 401, "catalog token for another replicable");
    // Admin routes only take this site's own key.
    let peer_admin = tokyo.authorization(
        "paris",
        &TokenData::scope(geoforge_crds::auth::Scope::Admin),
    );
    assert_eq!(get(s.admin, "/-/geo/status", Some(&peer_admin)).status, 401);
    assert_eq!(get(s.admin, "/-/geo/status", None).status, 401);

    // A status report for a site other than the token's: 403.
    let report = StatusReport {
        site: "berlin".into(),
        instance: "b-0".into(),
        role: "secondary".into(),
        ..Default::default()
    };
    let r = request(
        s.service,
        "POST",
        "/api/v4/geo/status",
        &[
            (
                "Authorization",
                &env.tokyo_auth(&TokenData::scope(geoforge_crds::auth::Scope::Status)),
            ),
            ("Content-Type", "application/json"),
        ],
        serde_json::to_string(&report).unwrap().as_bytes(),
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // And the valid token streams the blob.
    let r = get(s.service, path, Some(&env.tokyo_auth(&good)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, secret);
    assert_eq!(
        r.header("content-length"),
        Some(secret.len().to_string().as_str())
    );
    assert_eq!(r.header("geo-checksum"), Some(sum.as_str()));
    assert!(r.header("geo-api-version").is_some());
}

#[test]
fn geo_api_stale_checksum_conflicts_and_missing_file_is_404() {
    let env = Env::new("");
    write_file(&env.files(), "x/blob", b"version one");
    let s = env.start();
    let v1 = env.wait_item(&s, "files", "x/blob").checksum;
    let path = "/api/v4/geo/retrieve/files/x%2Fblob";
    // A validly signed token with a stale checksum → 409 with the current one.
    let stale = env.tokyo_auth(&TokenData::retrieve("files", "x/blob", &sha256_hex(b"old")));
    let r = get(s.service, path, Some(&stale));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json::<geoforge_crds::wire::ChecksumConflict>()
            .current_checksum,
        v1
    );
    // Changed on disk (no rescan needed): the retrieve notices, records it, answers 409.
    write_file(&env.files(), "x/blob", b"version two, longer");
    let v2 = sha256_hex(b"version two, longer");
    let r = get(
        s.service,
        path,
        Some(&env.tokyo_auth(&TokenData::retrieve("files", "x/blob", &v1))),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json::<geoforge_crds::wire::ChecksumConflict>()
            .current_checksum,
        v2
    );
    let r = get(
        s.service,
        path,
        Some(&env.tokyo_auth(&TokenData::retrieve("files", "x/blob", &v2))),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"version two, longer");
    let evs = env.events_page(&s, 0).events;
    assert!(
        evs.iter().any(|e| e.item_id == "x/blob"
            && e.event == EventKind::Updated
            && e.checksum.as_deref() == Some(v2.as_str())),
        "{evs:?}"
    );
    // Catalogued but gone from disk: 404 FILE_NOT_FOUND (before the rescan deletes it).
    write_file(&env.files(), "y/gone", b"soon gone");
    let g = env.wait_item(&s, "files", "y/gone").checksum;
    // Stop the rescan from racing: remove and ask at once; either the catalog still has it
    // (FILE_NOT_FOUND) or the rescan already deleted it (NOT_IN_CATALOG); both are 404.
    std::fs::remove_file(env.files().join("y/gone")).unwrap();
    let r = get(
        s.service,
        "/api/v4/geo/retrieve/files/y%2Fgone",
        Some(&env.tokyo_auth(&TokenData::retrieve("files", "y/gone", &g))),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let code = r.json::<serde_json::Value>()["geo_code"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        code == "FILE_NOT_FOUND" || code == "NOT_IN_CATALOG",
        "{code}"
    );
}

#[test]
fn geo_api_catalogued_but_missing_on_disk_is_file_not_found() {
    // deleteMin 0 / percent 0: every delete pauses, so the catalog keeps the item.
    let env = Env::new("rescanInterval: 300ms, deleteMin: 0, deletePercent: 0");
    write_file(&env.files(), "k/blob", b"kept in catalog");
    let s = env.start();
    let sum = env.wait_item(&s, "files", "k/blob").checksum;
    std::fs::remove_file(env.files().join("k/blob")).unwrap();
    wait_until(Duration::from_secs(20), "delete paused", || {
        let st = env.status(&s);
        st["replicables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["replicable"] == "files" && r["deletes_paused"].is_object())
            .then_some(())
    });
    let r = get(
        s.service,
        "/api/v4/geo/retrieve/files/k%2Fblob",
        Some(&env.tokyo_auth(&TokenData::retrieve("files", "k/blob", &sum))),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json::<serde_json::Value>()["geo_code"], "FILE_NOT_FOUND");
}

#[test]
fn geo_api_path_traversal_is_400() {
    let env = Env::new("");
    write_file(&env.files(), "ok", b"fine");
    std::fs::write(env.dir.path().join("storage/outside"), b"outside").unwrap();
    let s = env.start();
    env.wait_item(&s, "files", "ok");
    let variants = [
        "..",
        "..%2Foutside",
        "%2e%2e",
        "%2e%2e%2Foutside",
        "%2E%2E%2Foutside",
        "a%2F..%2F..%2Foutside",
        "%252e%252e%252Foutside",
        "%25252e%25252e",
        "%2Fetc%2Fpasswd",
        "a%00b",
        "..%5Coutside",
        "a%5Cb",
        "%C0%AE%C0%AE",
        ".",
        "a%2F%2Fb",
    ];
    for v in variants {
        for auth in [
            None,
            Some(env.tokyo_auth(&TokenData::retrieve("files", v, "x"))),
        ] {
            let r = get(
                s.service,
                &format!("/api/v4/geo/retrieve/files/{v}"),
                auth.as_deref(),
            );
            assert_eq!(r.status, 400, "{v}: {} {}", r.status, r.text());
            assert!(
                !r.text().contains("outside\n") && !r.text().contains("root:"),
                "{v}"
            );
        }
        let r = get(
            s.service,
            &format!("/api/v4/geo/repositories/repos/{v}/info/refs?service=git-upload-pack"),
            None,
        );
        assert_eq!(r.status, 400, "repositories {v}: {}", r.text());
    }
    // Raw slashes and dot segments in the path itself.
    for p in [
        "/api/v4/geo/retrieve/files/../../outside",
        "/api/v4/geo/retrieve/files/a/b",
        "/api/v4/geo/retrieve/files//etc/passwd",
        "/api/v4/geo/retrieve/..%2F/x",
    ] {
        let r = get(s.service, p, None);
        assert_eq!(r.status, 400, "{p}: {} {}", r.status, r.text());
    }
}

#[test]
fn geo_api_long_poll_returns_soon_after_a_commit() {
    let env = Env::new("");
    std::fs::create_dir_all(env.files()).unwrap();
    let s = env.start();
    let head = env.events_page(&s, 0).last_event_id;
    // An empty long-poll waits about `wait`, not less (and not forever).
    let t = Instant::now();
    let r = env.events(&s, head, 1);
    assert_eq!(r.status, 200);
    assert!(r.json::<EventsPage>().events.is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10));

    let auth = env.tokyo_auth(&TokenData::scope(geoforge_crds::auth::Scope::Events));
    let port = s.service;
    let poll = std::thread::spawn(move || {
        let r = get(
            port,
            &format!("/api/v4/geo/events?after={head}&wait=25"),
            Some(&auth),
        );
        (Instant::now(), r)
    });
    wait_until(Duration::from_secs(10), "long-poll parked", || {
        get(s.admin, "/-/metrics", None)
            .text()
            .lines()
            .any(|l| l == "geo_events_long_polls_waiting 1")
            .then_some(())
    });
    write_file(&env.files(), "lp/new", b"long poll");
    let committed = Instant::now();
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event":"created","replicable":"files","id":"lp/new"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (returned, r) = poll.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let page: EventsPage = r.json();
    assert!(
        page.events.iter().any(|e| e.item_id == "lp/new"),
        "{page:?}"
    );
    let latency = returned.saturating_duration_since(committed);
    assert!(
        latency < Duration::from_secs(3),
        "long-poll latency {latency:?}"
    );
    eprintln!("long-poll latency after commit: {latency:?}");
}

#[test]
fn geo_api_catalog_pagination_with_concurrent_inserts() {
    let env = Env::new("");
    for i in 0..40 {
        write_file(
            &env.files(),
            &format!("m/{i:03}"),
            format!("blob {i}").as_bytes(),
        );
    }
    let s = env.start();
    wait_until(Duration::from_secs(30), "40 items", || {
        (env.catalog(&s, "files", None, 1000).total >= 40).then_some(())
    });
    let mut seen: Vec<String> = vec![];
    let mut after: Option<String> = None;
    let mut added = 0;
    loop {
        let p = env.catalog(&s, "files", after.as_deref(), 7);
        seen.extend(p.items.iter().map(|i| i.id.clone()));
        // New items sorting before and after everything, while paging.
        if added < 4 {
            write_file(&env.files(), &format!("a/new{added}"), b"early");
            write_file(&env.files(), &format!("z/new{added}"), b"late");
            let h = env.hook(
                &s,
                HOOK_TOKEN,
                &format!(r#"{{"event":"created","replicable":"files","id":"a/new{added}"}}"#),
            );
            assert_eq!(h.status, 200);
            added += 1;
        }
        match p.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "an item was repeated: {seen:?}");
    for i in 0..40 {
        assert!(seen.contains(&format!("m/{i:03}")), "m/{i:03} skipped");
    }
    // Items created while paging come after the cursor, so the pass saw them too.
    for i in 0..added {
        assert!(
            seen.contains(&format!("a/new{i}")),
            "a/new{i} skipped: {seen:?}"
        );
    }
    let r = get(
        s.service,
        "/api/v4/geo/replicables/files?after=bogus",
        Some(&env.tokyo_auth(&TokenData::catalog("files"))),
    );
    assert_eq!(r.status, 400);
    let r = get(
        s.service,
        "/api/v4/geo/replicables/nope",
        Some(&env.tokyo_auth(&TokenData::catalog("nope"))),
    );
    assert_eq!(r.status, 404);
}

#[test]
fn geo_api_events_survive_kill9_after_push_and_hook() {
    let env = Env::new("rescanInterval: 1h");
    make_bare_repo(&env.repos().join("g/p.git"), 1);
    write_file(&env.files(), "d/one", b"one");
    let mut s = env.start();
    env.wait_item(&s, "repos", "g/p.git");
    let log_id = env.events_page(&s, 0).log_id;

    // A push through the embedded forge: acknowledged only after the event is committed.
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://alice:wonderland@127.0.0.1:{}/g/p.git", s.service);
    git(work.path(), &["clone", "-q", &url, "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("new.txt"), "pushed\n").unwrap();
    git(&w, &["add", "new.txt"]);
    git(&w, &["commit", "-q", "-m", "push me"]);
    git(&w, &["push", "-q", "origin", "HEAD:main"]);
    // The hook path too.
    write_file(&env.files(), "d/two", b"two");
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event":"created","replicable":"files","id":"d/two"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let hook_ids: Vec<i64> = r.json::<serde_json::Value>()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(hook_ids.len(), 1);
    s.kill9();

    // Without the storage markers the restarted primary refuses to rescan, so whatever the
    // log holds after the restart was committed before the acknowledgements.
    std::fs::remove_file(env.repos().join(".geoforge-storage-id")).unwrap();
    std::fs::remove_file(env.files().join(".geoforge-storage-id")).unwrap();
    let repo_sum = repo_checksum(&env.repos().join("g/p.git"));
    let s = env.start();
    wait_until(Duration::from_secs(20), "rescan refused", || {
        let st = env.status(&s);
        st["catalog"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["scan"]["refused"].is_string())
            .then_some(())
    });
    let page = env.events_page(&s, 0);
    assert_eq!(page.log_id, log_id, "same log after a restart");
    assert!(
        page.events.iter().any(|e| e.item_id == "g/p.git"
            && e.event == EventKind::Updated
            && e.checksum.as_deref() == Some(repo_sum.as_str())),
        "push event lost: {:?}",
        page.events
    );
    assert!(
        page.events
            .iter()
            .any(|e| e.id == hook_ids[0] && e.item_id == "d/two")
    );
    // A new database is a new log.
    drop(s);
    std::fs::remove_dir_all(env.dir.path().join("state")).unwrap();
    let s = env.start();
    assert_ne!(env.events_page(&s, 0).log_id, log_id);
    // The old markers were removed; a fresh catalog writes new ones.
    assert!(env.files().join(".geoforge-storage-id").is_file());
}

fn repo_checksum(repo: &Path) -> String {
    let out = git(
        repo,
        &["for-each-ref", "--format=%(refname) %(objectname)", "refs/"],
    );
    let mut lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    lines.sort_unstable();
    let mut h = sha2::Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[test]
fn geo_api_pruning_and_410() {
    let env = Env::new("");
    std::fs::create_dir_all(env.files()).unwrap();
    let s = env.start();
    for i in 0..6 {
        write_file(&env.files(), &format!("p/{i}"), format!("{i}").as_bytes());
        let r = env.hook(
            &s,
            HOOK_TOKEN,
            &format!(r#"{{"event":"created","replicable":"files","id":"p/{i}"}}"#),
        );
        assert_eq!(r.status, 200);
    }
    let page = env.events_page(&s, 0);
    let last = page.last_event_id;
    assert!(last >= 6);
    let ack = last - 2;
    let report = |site: &str, instance: &str, cursor: i64, key: &SiteKey| {
        let r = StatusReport {
            site: site.into(),
            instance: instance.into(),
            role: "secondary".into(),
            log_id: Some(page.log_id.clone()),
            cursor,
            reported_at: chrono::Utc::now(),
            ..Default::default()
        };
        let auth = env.key(key).authorization(
            "paris",
            &TokenData::scope(geoforge_crds::auth::Scope::Status),
        );
        let resp = request(
            s.service,
            "POST",
            "/api/v4/geo/status",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            serde_json::to_string(&r).unwrap().as_bytes(),
        );
        assert_eq!(resp.status, 200, "{}", resp.text());
    };
    // Only tokyo acknowledged: berlin (a known site) holds pruning back.
    report("tokyo", "tokyo-0", ack, &env.tokyo);
    report("tokyo", "tokyo-1", ack, &env.tokyo);
    assert_eq!(env.events(&s, 0, 0).status, 200);
    // Every instance of every known site acknowledged `ack`: pruned through it.
    report("berlin", "berlin-0", last, &env.berlin);
    let r = env.events(&s, 0, 0);
    assert_eq!(r.status, 410, "{}", r.text());
    let gone: EventsGone = r.json();
    assert_eq!(gone.oldest_id, ack + 1);
    assert_eq!(gone.last_event_id, last);
    assert_eq!(gone.log_id, page.log_id);
    assert!(r.header("geo-api-version").is_some());
    let r = env.events(&s, ack, 0);
    assert_eq!(r.status, 200);
    assert_eq!(r.json::<EventsPage>().events.len() as i64, last - ack);
    // Sites see both reports.
    let r = get(
        s.service,
        "/api/v4/geo/sites",
        Some(&env.tokyo_auth(&TokenData::scope(geoforge_crds::auth::Scope::Sites))),
    );
    assert_eq!(r.status, 200);
    let sites: geoforge_crds::wire::SitesResponse = r.json();
    assert_eq!(sites.sites.len(), 2);
    assert_eq!(
        sites
            .sites
            .iter()
            .find(|x| x.site == "tokyo")
            .unwrap()
            .instances
            .len(),
        2
    );
}

#[test]
fn geo_api_retention_prunes_unacknowledged_events() {
    let env = Env::new("rescanInterval: 300ms, eventRetention: 2s");
    write_file(&env.files(), "r/1", b"1");
    let s = env.start();
    env.wait_item(&s, "files", "r/1");
    let first = env.events_page(&s, 0);
    assert!(!first.events.is_empty());
    wait_until(Duration::from_secs(20), "retention pruning", || {
        (env.events(&s, 0, 0).status == 410).then_some(())
    });
}

#[test]
fn geo_api_missing_identity_marker_produces_no_deletes() {
    let env = Env::new("");
    write_file(&env.files(), "keep/a", b"a");
    write_file(&env.files(), "keep/b", b"b");
    let s = env.start();
    env.wait_item(&s, "files", "keep/b");
    assert!(
        env.files().join(".geoforge-storage-id").is_file(),
        "marker created on first start"
    );
    // Simulate an unmounted volume: marker and items gone.
    std::fs::rename(env.files(), env.dir.path().join("unmounted")).unwrap();
    std::fs::create_dir_all(env.files()).unwrap();
    let why = wait_until(Duration::from_secs(20), "scan refused", || {
        let st = env.status(&s);
        st["catalog"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["replicable"] == "files")
            .and_then(|c| c["scan"]["refused"].as_str().map(str::to_string))
    });
    assert!(why.contains(".geoforge-storage-id"), "{why}");
    assert!(
        env.status(&s)["paused"]
            .as_str()
            .unwrap()
            .contains("marker")
    );
    // A hook for a vanished item does not delete either.
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event":"deleted","replicable":"files","id":"keep/a"}"#,
    );
    assert_eq!(r.status, 200);
    let ids: Vec<String> = env
        .catalog_all(&s, "files")
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        env.events_page(&s, 0)
            .events
            .iter()
            .all(|e| e.event != EventKind::Deleted),
        "no deletes without the marker"
    );
    let m = get(s.admin, "/-/metrics", None).text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("geo_catalog_scan_refused{replicable=\"files\"} 1")),
        "{m}"
    );
}

#[test]
fn geo_api_mass_delete_pauses_until_confirmed() {
    let env = Env::new("rescanInterval: 300ms, deleteMin: 3, deletePercent: 10");
    write_file(&env.files(), "md/0", b"0");
    for i in 1..7 {
        write_file(
            &env.files(),
            &format!("mass/{i}"),
            format!("{i}").as_bytes(),
        );
    }
    for i in 7..10 {
        write_file(
            &env.files(),
            &format!("keep/{i}"),
            format!("{i}").as_bytes(),
        );
    }
    let s = env.start();
    wait_until(Duration::from_secs(30), "10 items", || {
        (env.catalog(&s, "files", None, 100).total == 10).then_some(())
    });
    // A small delete goes through.
    std::fs::remove_file(env.files().join("md/0")).unwrap();
    wait_until(Duration::from_secs(20), "single delete", || {
        env.events_page(&s, 0)
            .events
            .iter()
            .any(|e| e.item_id == "md/0" && e.event == EventKind::Deleted)
            .then_some(())
    });
    // Six at once (an atomic rename, so no rescan sees half of it).
    std::fs::rename(env.files().join("mass"), env.dir.path().join("trash")).unwrap();
    let paused = wait_until(Duration::from_secs(20), "deletes paused", || {
        let st = env.status(&s);
        st["replicables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replicable"] == "files")
            .and_then(|r| r["deletes_paused"].as_object().cloned())
            .filter(|p| p["count"] == 6)
    });
    let window = paused["window_id"].as_str().unwrap().to_string();
    assert_eq!(
        env.catalog(&s, "files", None, 100).total,
        9,
        "nothing deleted while paused"
    );
    let deletes = |s: &Sidecar| {
        env.events_page(s, 0)
            .events
            .iter()
            .filter(|e| e.event == EventKind::Deleted)
            .count()
    };
    assert_eq!(deletes(&s), 1);
    let m = get(s.admin, "/-/metrics", None).text();
    assert!(
        m.contains("geo_deletes_paused{replicable=\"files\"} 6"),
        "{m}"
    );
    // Confirming needs an admin token of this site.
    let confirm = |auth: &str, body: &str| {
        request(
            s.admin,
            "POST",
            "/-/geo/confirm-deletes",
            &[
                ("Authorization", auth),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    let peer = env.tokyo_auth(&TokenData::scope(geoforge_crds::auth::Scope::Admin));
    assert_eq!(confirm(&peer, "").status, 401);
    assert_eq!(
        confirm(&env.admin_auth(), r#"{"window_id":"nope"}"#).status,
        404
    );
    // One item comes back before the confirmation: it is not deleted.
    write_file(&env.files(), "mass/6", b"6");
    let r = confirm(&env.admin_auth(), &format!(r#"{{"window_id":"{window}"}}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json::<serde_json::Value>()["deleted"], 5);
    assert_eq!(deletes(&s), 6);
    wait_until(Duration::from_secs(20), "4 items", || {
        (env.catalog(&s, "files", None, 100).total == 4).then_some(())
    });
    let st = env.status(&s);
    assert!(
        st["replicables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["deletes_paused"].is_null())
    );
}

#[test]
fn geo_api_hooks() {
    let env = Env::new("rescanInterval: 1h");
    make_bare_repo(&env.repos().join("grp/proj.git"), 1);
    std::fs::create_dir_all(env.files()).unwrap();
    let s = env.start();
    env.wait_item(&s, "repos", "grp/proj.git");
    assert_eq!(env.hook(&s, "wrong", "{}").status, 401);
    let r = request(s.service, "POST", "/api/v4/geo/hooks", &[], b"{}");
    assert_eq!(r.status, 401);
    let r = env.hook(&s, HOOK_TOKEN, r#"{"event_name":"user_create","name":"x"}"#);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        env.hook(
            &s,
            HOOK_TOKEN,
            r#"{"event":"exploded","replicable":"files","id":"a"}"#
        )
        .status,
        422
    );
    assert_eq!(
        env.hook(
            &s,
            HOOK_TOKEN,
            r#"{"event":"created","replicable":"nope","id":"a"}"#
        )
        .status,
        422
    );
    assert_eq!(
        env.hook(
            &s,
            HOOK_TOKEN,
            r#"{"event":"created","replicable":"files","id":"../x"}"#
        )
        .status,
        400
    );
    assert_eq!(env.hook(&s, HOOK_TOKEN, "not json").status, 400);

    // A commit made outside the sidecar, announced by a GitLab push hook.
    commit_in_bare(&env.repos().join("grp/proj.git"));
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event_name":"push","project":{"path_with_namespace":"grp/proj"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = env.events_page(&s, 0).events;
    let sum = repo_checksum(&env.repos().join("grp/proj.git"));
    assert!(
        evs.iter().any(|e| e.item_id == "grp/proj.git"
            && e.event == EventKind::Updated
            && e.checksum.as_deref() == Some(sum.as_str())),
        "{evs:?}"
    );
    // project_destroy for a repository still on disk records nothing (the disk is the truth).
    let before = env.events_page(&s, 0).last_event_id;
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event_name":"project_destroy","path_with_namespace":"grp/proj"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(env.events_page(&s, 0).last_event_id, before);
    // A rename: new path created, old path deleted.
    std::fs::rename(
        env.repos().join("grp/proj.git"),
        env.repos().join("grp/renamed.git"),
    )
    .unwrap();
    let r = env.hook(
        &s,
        HOOK_TOKEN,
        r#"{"event_name":"project_rename","path_with_namespace":"grp/renamed","old_path_with_namespace":"grp/proj"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = env.events_page(&s, before).events;
    assert!(
        evs.iter()
            .any(|e| e.item_id == "grp/renamed.git" && e.event == EventKind::Created),
        "{evs:?}"
    );
    assert!(
        evs.iter()
            .any(|e| e.item_id == "grp/proj.git" && e.event == EventKind::Deleted),
        "{evs:?}"
    );
}

fn commit_in_bare(bare: &Path) {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", bare.to_str().unwrap(), "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("outside.txt"), "outside\n").unwrap();
    git(&w, &["add", "outside.txt"]);
    git(&w, &["commit", "-q", "-m", "outside"]);
    git(&w, &["push", "-q", "origin", "HEAD:main"]);
}

#[test]
fn geo_api_git_fetch_from_repository_endpoint() {
    let env = Env::new("");
    let bare = env.repos().join("team/app.git");
    make_bare_repo(&bare, 3);
    // A ref the forge hides from clients: replication still gets it.
    let head = git(&bare, &["rev-parse", "HEAD"]).trim().to_string();
    git(&bare, &["update-ref", "refs/hidden/secret", &head]);
    git(&bare, &["tag", "v1", &head]);
    git(&bare, &["config", "transfer.hideRefs", "refs/hidden"]);
    git(&bare, &["config", "uploadpack.hideRefs", "refs/hidden"]);
    let s = env.start();
    let item = env.wait_item(&s, "repos", "team/app.git");
    assert_eq!(item.checksum, repo_checksum(&bare));
    assert!(item.size > 0);

    let url = format!("{}/api/v4/geo/repositories/repos/team%2Fapp.git", s.url());
    let fetch = |auth: &str, target: &Path, proto: &str| {
        git_cmd(target)
            .env("GIT_CONFIG_COUNT", "2")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", format!("Authorization: {auth}"))
            .env("GIT_CONFIG_KEY_1", "protocol.version")
            .env("GIT_CONFIG_VALUE_1", proto)
            .args(["fetch", "-q", "--prune", &url, "+refs/*:refs/*"])
            .output()
            .unwrap()
    };
    for proto in ["2", "0"] {
        let dir = tempfile::tempdir().unwrap();
        let replica = dir.path().join("replica.git");
        git(
            dir.path(),
            &["init", "-q", "--bare", replica.to_str().unwrap()],
        );
        let auth = env.tokyo_auth(&TokenData::repository("repos", "team/app.git"));
        let out = fetch(&auth, &replica, proto);
        assert!(
            out.status.success(),
            "fetch (protocol {proto}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            repo_checksum(&replica),
            item.checksum,
            "protocol {proto}: same refs"
        );
        assert!(git(&replica, &["for-each-ref"]).contains("refs/hidden/secret"));
        // A token for another repository, or none: refused.
        let bad = env.tokyo_auth(&TokenData::repository("repos", "team/other.git"));
        let dir2 = tempfile::tempdir().unwrap();
        git(dir2.path(), &["init", "-q", "--bare", "r.git"]);
        let out = fetch(&bad, &dir2.path().join("r.git"), proto);
        assert!(!out.status.success());
    }
    // Receive-pack is refused.
    let auth = env.tokyo_auth(&TokenData::repository("repos", "team/app.git"));
    let r = get(
        s.service,
        "/api/v4/geo/repositories/repos/team%2Fapp.git/info/refs?service=git-receive-pack",
        Some(&auth),
    );
    assert_eq!(r.status, 403);
    let r = request(
        s.service,
        "POST",
        "/api/v4/geo/repositories/repos/team%2Fapp.git/git-receive-pack",
        &[("Authorization", &auth)],
        b"0000",
    );
    assert_eq!(r.status, 403);
    let r = get(
        s.service,
        "/api/v4/geo/repositories/repos/team%2Fapp.git/info/refs?service=git-upload-pack",
        Some(&auth),
    );
    assert_eq!(r.status, 200);
    assert!(r.header("geo-api-version").is_some());
    // Not in the catalog: 404 after authentication.
    let r = get(
        s.service,
        "/api/v4/geo/repositories/repos/no%2Fsuch.git/info/refs?service=git-upload-pack",
        Some(&env.tokyo_auth(&TokenData::repository("repos", "no/such.git"))),
    );
    assert_eq!(r.status, 404);
}

#[test]
fn geo_api_status_and_metrics() {
    let env = Env::new("");
    make_bare_repo(&env.repos().join("s/one.git"), 1);
    write_file(&env.files(), "f/1", b"1");
    let s = env.start();
    env.wait_item(&s, "repos", "s/one.git");
    env.wait_item(&s, "files", "f/1");
    let st = env.status(&s);
    assert_eq!(st["site"], "paris");
    assert_eq!(st["role"], "primary");
    assert!(st["log_id"].is_string());
    assert!(st["last_event_id"].as_i64().unwrap() >= 2);
    let cat = st["catalog"].as_array().unwrap();
    assert!(
        cat.iter()
            .any(|c| c["replicable"] == "repos" && c["items"] == 1)
    );
    let m = get(s.admin, "/-/metrics", None).text();
    assert!(
        m.contains("geo_catalog_items{replicable=\"files\"} 1"),
        "{m}"
    );
    // Unknown routes and wrong methods under the Geo API still answer JSON with the version.
    for (method, path) in [("GET", "/api/v4/geo/nope"), ("GET", "/api/v4/geo/status")] {
        let r = request(s.service, method, path, &[], b"");
        assert!(r.status == 404 || r.status == 405, "{path}: {}", r.status);
        assert!(r.header("geo-api-version").is_some(), "{path}");
    }
    assert!(
        m.lines().any(|l| l.starts_with("geo_last_event_id ")),
        "{m}"
    );
}
