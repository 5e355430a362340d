//! A secondary sidecar proxying to a stand-in primary (a hyper server in this process):
//! methods and bodies, header hygiene, streaming, WebSocket, rewrites, discovery, 503s.

use bytes::Bytes;
use geoforge_crds::auth::{KeyRing, Scope};
use geoforge_tests::httpd::{self, Handler, TestBody, TestServer, full, respond};
use geoforge_tests::{Sidecar, SiteKey, site_key, wait_until, wait_until_async};
use http::{Request, Response};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the stand-in primary saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: http::HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Upstream {
    seen: Mutex<Vec<Seen>>,
    release: tokio::sync::Notify,
    name: Mutex<String>,
}

impl Upstream {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn last(&self) -> Seen {
        self.seen().last().cloned().expect("upstream saw a request")
    }
}

/// A stand-in primary: echoes bodies, streams, redirects, upgrades.
fn upstream(name: &str) -> (TestServer, Arc<Upstream>) {
    let state = Arc::new(Upstream::default());
    *state.name.lock().unwrap() = name.to_string();
    let st = state.clone();
    let own_url = Arc::new(Mutex::new(String::new()));
    let own = own_url.clone();
    let handler: Handler = Arc::new(move |_peer, mut req: Request<hyper::body::Incoming>| {
        let st = st.clone();
        let own = own.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            // The secondary's own replication calls the Geo API of its primary: not recorded.
            if path.starts_with("/api/v4/geo/") {
                return respond(404, "no Geo API here");
            }
            if path == "/ws" {
                let on = hyper::upgrade::on(&mut req);
                st.seen.lock().unwrap().push(Seen {
                    method: req.method().to_string(),
                    uri: req.uri().to_string(),
                    headers: req.headers().clone(),
                    body: Bytes::new(),
                });
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        let (mut r, mut w) = tokio::io::split(&mut io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                return Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .body(full(""))
                    .unwrap();
            }
            let (parts, body) = req.into_parts();
            if path == "/stream" {
                st.seen.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers: parts.headers.clone(),
                    body: Bytes::new(),
                });
                let (tx, rx) = tokio::sync::mpsc::channel::<
                    Result<hyper::body::Frame<Bytes>, httpd::BoxError>,
                >(4);
                let st2 = st.clone();
                tokio::spawn(async move {
                    let _ = tx
                        .send(Ok(hyper::body::Frame::data(Bytes::from("first\n"))))
                        .await;
                    st2.release.notified().await;
                    let _ = tx
                        .send(Ok(hyper::body::Frame::data(Bytes::from("rest\n"))))
                        .await;
                });
                let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
                return Response::new(TestBody::new(body));
            }
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            st.seen.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
            if path == "/slow" {
                st.release.notified().await;
                return respond(200, "slow done");
            }
            if path == "/headers" {
                return Response::builder()
                    .status(200)
                    .header("x-multi", "a")
                    .header("keep-alive", "timeout=5")
                    .header("x-request-id", "from-upstream")
                    .header("x-multi", "b")
                    .header("content-type", "text/x-test")
                    .body(full("headers"))
                    .unwrap();
            }
            if path == "/redirect" {
                let base = own.lock().unwrap().clone();
                return Response::builder()
                    .status(302)
                    .header("location", format!("{base}/next?x=1"))
                    .header("refresh", format!("3; url={base}/later"))
                    .header("set-cookie", "s=1; Domain=127.0.0.1; Path=/; HttpOnly")
                    .body(full(""))
                    .unwrap();
            }
            let name = st.name.lock().unwrap().clone();
            Response::builder()
                .status(200)
                .header("x-upstream", name)
                .header("connection", "x-upstream-hop")
                .header("x-upstream-hop", "1")
                .body(full(body))
                .unwrap()
        })
    });
    let server = TestServer::start(handler);
    *own_url.lock().unwrap() = server.url();
    (server, state)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The internal API stand-in: serves the current proxy config, or fails.
#[derive(Default)]
struct InternalApi {
    url: Mutex<Option<String>>,
    failing: std::sync::atomic::AtomicBool,
    polls: std::sync::atomic::AtomicUsize,
    failed_polls: std::sync::atomic::AtomicUsize,
    auth: Mutex<Vec<String>>,
}

fn internal_api() -> (TestServer, Arc<InternalApi>) {
    use std::sync::atomic::Ordering::SeqCst;
    let state = Arc::new(InternalApi::default());
    let st = state.clone();
    let handler: Handler = Arc::new(move |_peer, req: Request<hyper::body::Incoming>| {
        let st = st.clone();
        Box::pin(async move {
            st.polls.fetch_add(1, SeqCst);
            if let Some(a) = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
            {
                st.auth.lock().unwrap().push(a.to_string());
            }
            if req.uri().path() != "/api/v4/geo/proxy" {
                return respond(404, "no");
            }
            if st.failing.load(SeqCst) {
                st.failed_polls.fetch_add(1, SeqCst);
                return respond(500, "internal error");
            }
            let url = st.url.lock().unwrap().clone();
            let body = serde_json::json!({
                "geo_enabled": true, "geo_proxy_url": url, "geo_proxy_extra_data": null
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap()
        })
    });
    (TestServer::start(handler), state)
}

struct Keys {
    tokyo: SiteKey,
    paris: SiteKey,
}

fn keys(dir: &Path) -> Keys {
    Keys {
        tokyo: site_key(dir, "tokyo"),
        paris: site_key(dir, "paris"),
    }
}

/// A secondary config; `primary` is the YAML of the `primary:` block.
fn secondary_yaml(dir: &Path, k: &Keys, primary: &str, extra: &str) -> String {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    format!(
        r#"siteId: tokyo
role: secondary
externalUrl: http://tokyo.example.test
allowInsecure: true
stateDir: {state}
storageRoot: {data}
primary: {primary}
keys:
  kid: tokyo.1
  privateKeyFile: {key}
  trusted:
    - {{ kid: paris.1, publicKey: {paris} }}
proxy: {{ connectTimeout: 2s, headerReadTimeout: 10s, shutdownGrace: 20s }}
{extra}
"#,
        state = dir.join("state").display(),
        data = dir.join("data").display(),
        key = k.tokyo.file.display(),
        paris = k.paris.public,
    )
}

fn verify_extra_data(k: &Keys, value: &str) -> Result<String, String> {
    let mut ring = KeyRing::new(Duration::from_secs(60));
    ring.add_ed25519("tokyo.1", "tokyo", &k.tokyo.public)
        .unwrap();
    ring.verify_token(value, "paris", Scope::Proxy)
        .map(|v| v.site)
        .map_err(|e| e.to_string())
}

fn h<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_every_method_with_bodies_and_geo_headers() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (up, st) = upstream("paris");
    let yaml = secondary_yaml(
        dir.path(),
        &k,
        &format!("{{ staticUrl: \"{}\" }}", up.url()),
        "",
    );
    let sc = Sidecar::start(dir.path(), "tokyo", &yaml);
    for method in [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND",
    ] {
        let body = format!("body of {method} ").repeat(1000);
        let req = Request::builder()
            .method(method)
            .uri(format!("{}/group/project/-/x?q=1&r=2", sc.url()))
            .header("connection", "x-hop")
            .header("x-hop", "secret")
            .header("x-custom", "kept")
            .body(full(body.clone()))
            .unwrap();
        let r = httpd::send(req, Duration::from_secs(20)).await.unwrap();
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        assert_eq!(r.text(), body, "{method}: response body echoed");
        assert_eq!(r.header("x-upstream"), Some("paris"));
        assert!(
            r.header("x-upstream-hop").is_none(),
            "hop-by-hop response header removed"
        );
        assert!(r.header("x-request-id").is_some());
        let s = st.last();
        assert_eq!(s.method, method);
        assert_eq!(s.uri, "/group/project/-/x?q=1&r=2");
        assert_eq!(s.body, body.as_bytes(), "{method}: request body forwarded");
        assert_eq!(h(&s, "host"), Some(up.addr.to_string().as_str()));
        assert_eq!(h(&s, "x-custom"), Some("kept"));
        assert!(
            h(&s, "x-hop").is_none(),
            "hop-by-hop request header removed"
        );
        assert_eq!(h(&s, "x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(h(&s, "x-forwarded-proto"), Some("http"));
        assert_eq!(
            h(&s, "x-forwarded-host"),
            Some(format!("127.0.0.1:{}", sc.service).as_str())
        );
        assert!(
            h(&s, "forwarded")
                .unwrap()
                .starts_with("for=127.0.0.1;proto=http")
        );
        assert_eq!(h(&s, "gitlab-workhorse-geo-proxy"), Some("1"));
        assert!(h(&s, "x-request-id").is_some());
        let extra = h(&s, "gitlab-workhorse-geo-proxy-extra-data").unwrap();
        assert_eq!(verify_extra_data(&k, extra), Ok("tokyo".into()));
    }
    // HEAD: no body either way.
    let req = Request::head(format!("{}/x", sc.url()))
        .body(full(""))
        .unwrap();
    let r = httpd::send(req, Duration::from_secs(20)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(st.last().method, "HEAD");
    // The response's headers are the same whichever way the request is read: plain requests
    // (the HTTP/1.1 fast path, whose end-to-end lines pass through as sent) and those with a
    // body (hyper, which writes the map).
    for (way, method, body) in [("plain", "GET", ""), ("with a body", "POST", "x")] {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}/headers", sc.url()))
            .body(full(body))
            .unwrap();
        let r = httpd::send(req, Duration::from_secs(20)).await.unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "headers"), "{way}");
        let all = |n: &str| -> Vec<&str> {
            r.headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-multi"), ["a", "b"], "{way}: both, in order");
        assert_eq!(all("content-type"), ["text/x-test"], "{way}");
        assert_eq!(all("content-length"), ["7"], "{way}");
        assert_eq!(all("date").len(), 1, "{way}: one date");
        assert!(
            all("keep-alive").is_empty(),
            "{way}: hop-by-hop header removed"
        );
        let sent = h(&st.last(), "x-request-id").unwrap().to_string();
        assert_eq!(
            all("x-request-id"),
            [sent.as_str()],
            "{way}: ours, not the upstream's"
        );
    }
    // The request id is passed through when the client sends one.
    let r = httpd::get(&format!("{}/id", sc.url()), &[("x-request-id", "abc-123")])
        .await
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(h(&st.last(), "x-request-id"), Some("abc-123"));
    // HTTP/2 (h2c, prior knowledge) from the client; HTTP/1.1 with the right Host upstream.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        h2.request(
            Request::post(format!("{}/over-h2", sc.url()))
                .body(full("h2 body"))
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"h2 body");
    let s = st.last();
    assert_eq!(s.uri, "/over-h2");
    assert_eq!(h(&s, "host"), Some(up.addr.to_string().as_str()));
    assert_eq!(
        h(&s, "x-forwarded-host"),
        Some(format!("127.0.0.1:{}", sc.service).as_str())
    );
    // Tokens are never logged.
    let extra = h(&st.last(), "gitlab-workhorse-geo-proxy-extra-data")
        .unwrap()
        .to_string();
    let jwt = extra.split_once(':').unwrap().1;
    assert!(
        !sc.log().contains(jwt),
        "the extra-data token must not be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_and_geo_headers_never_reach_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (up, st) = upstream("paris");
    let spoof = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
        ("gitlab-workhorse-geo-proxy", "1"),
        ("gitlab-workhorse-geo-proxy-extra-data", "paris.1:forged"),
        ("gitlab-workhorse-geo-proxy-whatever", "x"),
    ];
    let primary = format!("{{ staticUrl: \"{}\" }}", up.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    let r = httpd::get(&format!("{}/spoof", sc.url()), &spoof)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let s = st.last();
    assert_eq!(h(&s, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        h(&s, "x-forwarded-host"),
        Some(format!("127.0.0.1:{}", sc.service).as_str())
    );
    assert_eq!(h(&s, "x-forwarded-proto"), Some("http"));
    assert!(!h(&s, "forwarded").unwrap().contains("6.6.6.6"));
    assert!(h(&s, "gitlab-workhorse-geo-proxy-whatever").is_none());
    let extra = h(&s, "gitlab-workhorse-geo-proxy-extra-data").unwrap();
    assert_ne!(extra, "paris.1:forged");
    assert_eq!(verify_extra_data(&k, extra), Ok("tokyo".into()));
    drop(sc);

    // From a trusted proxy the forwarding headers are kept (and this hop appended); the Geo
    // headers are still the sidecar's own.
    let dir2 = tempfile::tempdir().unwrap();
    let k2 = keys(dir2.path());
    let sc = Sidecar::start(
        dir2.path(),
        "tokyo",
        &secondary_yaml(
            dir2.path(),
            &k2,
            &primary,
            "trustedProxies: [\"127.0.0.0/8\"]",
        ),
    );
    let r = httpd::get(&format!("{}/trusted", sc.url()), &spoof)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let s = st.last();
    assert_eq!(s.uri, "/trusted");
    assert_eq!(h(&s, "x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(h(&s, "x-forwarded-host"), Some("evil.example"));
    assert_eq!(h(&s, "x-forwarded-proto"), Some("https"));
    assert!(
        h(&s, "forwarded")
            .unwrap()
            .starts_with("for=6.6.6.6, for=127.0.0.1")
    );
    assert!(h(&s, "gitlab-workhorse-geo-proxy-whatever").is_none());
    let extra = h(&s, "gitlab-workhorse-geo-proxy-extra-data").unwrap();
    assert_eq!(verify_extra_data(&k2, extra), Ok("tokyo".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_first_byte_before_the_upstream_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (up, st) = upstream("paris");
    let primary = format!("{{ staticUrl: \"{}\" }}", up.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    let resp = httpd::client()
        .request(
            Request::get(format!("{}/stream", sc.url()))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The upstream holds the rest until released: the first chunk must arrive before that.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk before the upstream finished")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first\n");
    st.release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&rest[..], b"rest\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (up, st) = upstream("paris");
    let primary = format!("{{ staticUrl: \"{}\" }}", up.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sc.service))
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: tokyo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !head.ends_with(b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "no 101 head");
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the 101: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let seen = st.last();
    assert_eq!(h(&seen, "upgrade"), Some("websocket"));
    assert!(h(&seen, "sec-websocket-key").is_some());
    // A masked text frame "hello" and a second message: echoed back verbatim, in order.
    for msg in [
        &b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"[..],
        b"second message",
    ] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_refresh_and_cookies_rewritten_for_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (up, _st) = upstream("paris");
    let primary = format!("{{ staticUrl: \"{}\" }}", up.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    let r = httpd::get(&format!("{}/redirect", sc.url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("http://tokyo.example.test/next?x=1")
    );
    assert_eq!(
        r.header("refresh"),
        Some("3; url=http://tokyo.example.test/later")
    );
    let cookie = r.header("set-cookie").unwrap();
    assert!(!cookie.to_lowercase().contains("domain"), "{cookie}");
    assert!(cookie.starts_with("s=1"), "{cookie}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_unreachable_primary_gets_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    // Unknown: the internal API says there is no primary URL.
    let (api, api_state) = internal_api();
    let primary = format!("{{ internalApi: \"{}\", pollInterval: 200ms }}", api.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    wait_until(Duration::from_secs(10), "a poll", || {
        (api_state.polls.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    let r = httpd::get(&format!("{}/group/p.git/info/refs", sc.url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(r.text().contains("primary"), "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let r = httpd::get(
        &format!("{}/api/v4/projects", sc.url()),
        &[("accept", "application/json")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v["message"].as_str().unwrap().contains("primary"));
    drop(sc);

    // Unreachable: a static URL where nothing listens. Answered fast, never a hang or a 500.
    let dir2 = tempfile::tempdir().unwrap();
    let k2 = keys(dir2.path());
    let dead = format!(
        "{{ staticUrl: \"http://127.0.0.1:{}\" }}",
        geoforge_tests::free_port()
    );
    let sc = Sidecar::start(
        dir2.path(),
        "tokyo",
        &secondary_yaml(dir2.path(), &k2, &dead, ""),
    );
    for accept in ["text/plain", "application/json"] {
        let t = Instant::now();
        let r = httpd::get(&format!("{}/x", sc.url()), &[("accept", accept)])
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        assert!(r.text().contains("unreachable"), "{}", r.text());
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
    let metrics = httpd::get(&format!("{}/-/metrics", sc.admin_url()), &[])
        .await
        .unwrap();
    assert!(
        metrics
            .text()
            .contains("geo_proxy_upstream_errors_total{target=\"primary\",kind=\"connect\"}"),
        "{}",
        metrics.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_switch_after_a_poll_and_last_good_config_kept() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let (a, _sa) = upstream("A");
    let (b, _sb) = upstream("B");
    let (mut api, api_state) = internal_api();
    *api_state.url.lock().unwrap() = Some(a.url());
    let primary = format!("{{ internalApi: \"{}\", pollInterval: 200ms }}", api.url());
    let sc = Sidecar::start(
        dir.path(),
        "tokyo",
        &secondary_yaml(dir.path(), &k, &primary, ""),
    );
    let url = format!("{}/which", sc.url());
    let which = |url: String| async move {
        httpd::get(&url, &[])
            .await
            .ok()
            .and_then(|r| r.header("x-upstream").map(str::to_string))
    };
    wait_until_async(Duration::from_secs(10), "routing to A", || {
        let u = url.clone();
        async move { (which(u).await.as_deref() == Some("A")).then_some(()) }
    })
    .await;
    // The poll authenticates as this site with a proxy-config token.
    let auth = api_state.auth.lock().unwrap().last().cloned().unwrap();
    let mut ring = KeyRing::new(Duration::from_secs(60));
    ring.add_ed25519("tokyo.1", "tokyo", &k.tokyo.public)
        .unwrap();
    let v = ring
        .verify_authorization(Some(&auth), "tokyo", Scope::ProxyConfig)
        .unwrap();
    assert_eq!(v.site, "tokyo");

    *api_state.url.lock().unwrap() = Some(b.url());
    wait_until_async(Duration::from_secs(10), "routing to B after a poll", || {
        let u = url.clone();
        async move { (which(u).await.as_deref() == Some("B")).then_some(()) }
    })
    .await;

    // The internal API fails: the last good config (B) stays.
    api_state.failing.store(true, SeqCst);
    wait_until(Duration::from_secs(10), "three failed polls", || {
        (api_state.failed_polls.load(SeqCst) >= 3).then_some(())
    });
    assert_eq!(which(url.clone()).await.as_deref(), Some("B"));
    // …and when it is down altogether.
    api.stop();
    let polls = api_state.polls.load(SeqCst);
    let since = Instant::now();
    let mut answers = HashMap::new();
    while since.elapsed() < Duration::from_millis(1500) {
        *answers.entry(which(url.clone()).await).or_insert(0) += 1;
    }
    assert_eq!(api_state.polls.load(SeqCst), polls, "the API is down");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers.keys().next().unwrap().as_deref(), Some("B"));
    // One log line for the failure state, not one per poll.
    let log = httpd::strip_ansi(&sc.log());
    assert_eq!(
        log.matches("polling the proxy config failed").count(),
        1,
        "{log}"
    );
    let m = httpd::get(&format!("{}/-/metrics", sc.admin_url()), &[])
        .await
        .unwrap();
    assert!(
        m.text()
            .contains("geo_proxy_config_polls_total{result=\"failure\"}")
    );
    assert!(m.text().contains("geo_proxy_config_age_seconds"));
}

/// An upstream that drops a kept-alive connection when the next request arrives on it (as a
/// server does when its keep-alive timer fires while a request is in flight): the secondary
/// retries an idempotent request once on a fresh connection; a POST is not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_request_retried_once_after_a_stale_pooled_connection() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // requests answered so far; whether a kept-alive connection was dropped
    let answered = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let posts = Arc::new(AtomicUsize::new(0));
    let (a, d, p) = (answered.clone(), dropped.clone(), posts.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let (a, d, p) = (a.clone(), d.clone(), p.clone());
            std::thread::spawn(move || {
                let read_head = |s: &mut std::net::TcpStream| -> Option<String> {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).ok()? == 0 {
                            return None;
                        }
                        head.push(b[0]);
                    }
                    Some(String::from_utf8_lossy(&head).to_string())
                };
                let mut served = 0;
                while let Some(head) = read_head(&mut s) {
                    if head.starts_with("GET /-/") || head.contains("/api/v4/geo/") {
                        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                        continue;
                    }
                    if head.starts_with("POST ") {
                        p.fetch_add(1, SeqCst);
                        return; // a POST is never answered: the connection dies under it
                    }
                    if served == 1 && !d.swap(true, SeqCst) {
                        return; // stale: close without answering
                    }
                    let body = if a.fetch_add(1, SeqCst) == 0 {
                        "one"
                    } else {
                        "two"
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    served += 1;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let primary = format!("{{ staticUrl: \"http://{addr}\" }}");
    // Pools are per I/O thread: with one thread the second request is offered the first
    // one's pooled connection.
    let yaml = secondary_yaml(dir.path(), &k, &primary, "")
        .replace("shutdownGrace: 20s }", "shutdownGrace: 20s, ioThreads: 1 }");
    let sc = Sidecar::start(dir.path(), "tokyo", &yaml);
    let r = httpd::get(&format!("{}/a", sc.url()), &[]).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "one"));
    let r = httpd::get(&format!("{}/b", sc.url()), &[]).await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "two"),
        "retried on a new connection"
    );
    assert!(
        dropped.load(SeqCst),
        "the pooled connection was dropped under the request"
    );
    // A POST that reached the upstream is not sent again when its connection dies.
    let req = hyper::Request::post(format!("{}/c", sc.url()))
        .body(httpd::full(""))
        .unwrap();
    let r = httpd::send(req, Duration::from_secs(20)).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text()); // the secondary's answer to a failed upstream
    assert_eq!(posts.load(SeqCst), 1, "the POST was sent exactly once");
}
