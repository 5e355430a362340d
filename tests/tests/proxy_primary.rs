//! A primary sidecar fronting an upstream forge (a hyper server in this process), with a
//! secondary proxying to it: the primary honours forwarded client addresses only with a valid
//! extra-data token, strips the Geo headers before the forge, and detects pushes in the
//! forge's receive-pack responses.

use bytes::Bytes;
use geoforge_tests::httpd::{self, Handler, TestServer, full};
use geoforge_tests::{Sidecar, SiteKey, site_key, wait_until};
use http::{Request, Response};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Seen = Arc<Mutex<Vec<http::HeaderMap>>>;

fn pkt(s: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s);
    v
}

/// A forge stand-in: records request headers; answers receive-pack with a report-status
/// (side-band-64k) that accepts `refs/heads/main` for `/ok.git` and rejects it otherwise.
fn forge() -> (TestServer, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let handler: Handler = Arc::new(move |_peer, req: Request<hyper::body::Incoming>| {
        let s = s.clone();
        Box::pin(async move {
            s.lock().unwrap().push(req.headers().clone());
            let path = req.uri().path().to_string();
            if path.ends_with("/git-receive-pack") {
                let mut inner = pkt(b"unpack ok\n");
                if path.starts_with("/ok.git") {
                    inner.extend(pkt(b"ok refs/heads/main\n"));
                } else {
                    inner.extend(pkt(b"ng refs/heads/main pre-receive hook declined\n"));
                }
                inner.extend(b"0000");
                let mut band1 = vec![1u8];
                band1.extend(inner);
                let mut body = pkt(b"\x02remote: checking\n");
                body.extend(pkt(&band1));
                body.extend(b"0000");
                return Response::builder()
                    .header("content-type", "application/x-git-receive-pack-result")
                    .body(full(Bytes::from(body)))
                    .unwrap();
            }
            Response::new(full("forge page"))
        })
    });
    (TestServer::start(handler), seen)
}

fn base(dir: &Path, site: &str, key: &SiteKey, peer_kid: &str, peer_pk: &str) -> String {
    std::fs::create_dir_all(dir.join(site).join("data")).unwrap();
    format!(
        r#"siteId: {site}
externalUrl: http://{site}.example.test
allowInsecure: true
stateDir: {state}
storageRoot: {data}
keys:
  kid: {kid}
  privateKeyFile: {file}
  trusted: [{{ kid: {peer_kid}, publicKey: {peer_pk} }}]
"#,
        state = dir.join(site).join("state").display(),
        data = dir.join(site).join("data").display(),
        kid = key.kid,
        file = key.file.display(),
    )
}

fn h<'a>(m: &'a http::HeaderMap, n: &str) -> Option<&'a str> {
    m.get(n).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_trusts_forwarded_address_only_from_a_verified_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let paris = site_key(dir.path(), "paris");
    let tokyo = site_key(dir.path(), "tokyo");
    let (fg, seen) = forge();
    let p_yaml = format!(
        "{}role: primary\nforge: {{ upstreamUrl: \"{}\" }}\n",
        base(dir.path(), "paris", &paris, "tokyo.1", &tokyo.public),
        fg.url()
    );
    let primary = Sidecar::start(dir.path(), "paris", &p_yaml);
    // The secondary trusts its own ingress (loopback) so the client's address is 6.6.6.6.
    let s_yaml = format!(
        "{}role: secondary\nprimary: {{ staticUrl: \"{}\" }}\ntrustedProxies: [\"127.0.0.1/32\"]\n",
        base(dir.path(), "tokyo", &tokyo, "paris.1", &paris.public),
        primary.url()
    );
    let secondary = Sidecar::start(dir.path(), "tokyo", &s_yaml);

    // Through the secondary: the forwarded chain is honoured, Geo headers stripped.
    let r = httpd::get(
        &format!("{}/group/project", secondary.url()),
        &[("x-forwarded-for", "6.6.6.6")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "forge page");
    let got = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        h(&got, "x-forwarded-for"),
        Some("6.6.6.6, 127.0.0.1, 127.0.0.1")
    );
    assert!(
        got.keys()
            .all(|k| !k.as_str().starts_with("gitlab-workhorse-geo-proxy")),
        "{got:?}"
    );
    assert_eq!(h(&got, "host"), Some(fg.addr.to_string().as_str()));
    wait_until(Duration::from_secs(5), "the proxying site logged", || {
        httpd::strip_ansi(&primary.log())
            .contains("via=tokyo")
            .then_some(())
    });

    // Directly, with spoofed headers and forged extra data: nothing of it reaches the forge.
    let r = httpd::get(
        &format!("{}/group/project", primary.url()),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("gitlab-workhorse-geo-proxy", "1"),
            (
                "gitlab-workhorse-geo-proxy-extra-data",
                "tokyo.1:eyJhbGciOiJFZERTQSJ9.e30.AAAA",
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let got = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(h(&got, "x-forwarded-for"), Some("127.0.0.1"));
    assert!(
        got.keys()
            .all(|k| !k.as_str().starts_with("gitlab-workhorse-geo-proxy")),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_an_upstream_forge_are_detected_from_report_status() {
    let dir = tempfile::tempdir().unwrap();
    let paris = site_key(dir.path(), "paris");
    let tokyo = site_key(dir.path(), "tokyo");
    let (fg, _seen) = forge();
    let p_yaml = format!(
        "{}role: primary\nforge: {{ upstreamUrl: \"{}\" }}\n",
        base(dir.path(), "paris", &paris, "tokyo.1", &tokyo.public),
        fg.url()
    );
    let primary = Sidecar::start(dir.path(), "paris", &p_yaml);
    for (repo, accepted) in [("rejected", false), ("ok", true)] {
        let req = Request::post(format!("{}/{repo}.git/git-receive-pack", primary.url()))
            .header("content-type", "application/x-git-receive-pack-request")
            .body(full("0000"))
            .unwrap();
        let r = httpd::send(req, Duration::from_secs(20)).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.body.ends_with(b"0000"),
            "the whole report reaches the client"
        );
        let log = httpd::strip_ansi(&primary.log());
        let line = format!("path=/{repo}.git/git-receive-pack");
        assert_eq!(
            log.lines()
                .any(|l| l.contains("push completed") && l.contains(&line)),
            accepted,
            "{repo}: {log}"
        );
    }
}
