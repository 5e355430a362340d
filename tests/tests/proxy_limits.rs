//! Bad input on the service port (431, 400, conflicting framing) never reaches the upstream;
//! SIGTERM drains in-flight requests and exits 0.

use geoforge_tests::httpd::{self, Handler, TestServer, respond};
use geoforge_tests::{Sidecar, site_key, wait_until};
use http::Request;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

struct Counting {
    hits: AtomicUsize,
    release: tokio::sync::Notify,
}

fn counting_upstream() -> (TestServer, Arc<Counting>) {
    let st = Arc::new(Counting {
        hits: AtomicUsize::new(0),
        release: tokio::sync::Notify::new(),
    });
    let s = st.clone();
    let handler: Handler = Arc::new(move |_peer, req: Request<hyper::body::Incoming>| {
        let s = s.clone();
        Box::pin(async move {
            // The secondary's own replication calls the Geo API of its primary: not counted.
            if req.uri().path().starts_with("/api/v4/geo/") {
                return respond(404, "no Geo API here");
            }
            s.hits.fetch_add(1, SeqCst);
            if req.uri().path() == "/slow" {
                s.release.notified().await;
                return respond(200, "slow done");
            }
            respond(200, "ok")
        })
    });
    (TestServer::start(handler), st)
}

fn secondary(dir: &Path, upstream: &str) -> Sidecar {
    let k = site_key(dir, "tokyo");
    let p = site_key(dir, "paris");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let yaml = format!(
        r#"siteId: tokyo
role: secondary
externalUrl: http://tokyo.example.test
allowInsecure: true
stateDir: {state}
storageRoot: {data}
primary: {{ staticUrl: "{upstream}" }}
keys:
  kid: tokyo.1
  privateKeyFile: {key}
  trusted: [{{ kid: paris.1, publicKey: {pk} }}]
proxy: {{ maxHeaderBytes: 8192, headerReadTimeout: 2s, shutdownGrace: 20s }}
"#,
        state = dir.join("state").display(),
        data = dir.join("data").display(),
        key = k.file.display(),
        pk = p.public,
    );
    Sidecar::start(dir, "tokyo", &yaml)
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[test]
fn bad_requests_are_refused_before_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (up, st) = counting_upstream();
    let sc = secondary(dir.path(), &up.url());
    let addr = format!("127.0.0.1:{}", sc.service);
    let t = Duration::from_secs(10);

    // A well-formed request does reach it (the counter works).
    let ok = httpd::raw_request(
        &addr,
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(status_line(&ok).contains(" 200"), "{ok}");
    assert_eq!(st.hits.load(SeqCst), 1);

    // Oversized header block → 431.
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = httpd::raw_request(&addr, big.as_bytes(), t);
    assert!(status_line(&r).contains(" 431"), "{r}");

    // Malformed request line / header → 400.
    let r = httpd::raw_request(&addr, b"THIS IS NOT HTTP\r\n\r\n", t);
    assert!(status_line(&r).contains(" 400"), "{r}");
    let r = httpd::raw_request(
        &addr,
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        t,
    );
    assert!(status_line(&r).contains(" 400"), "{r}");

    // Conflicting Content-Length and Transfer-Encoding → 400, connection closed.
    let smuggle = b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = httpd::raw_request(&addr, smuggle, t);
    assert!(status_line(&r).contains(" 400"), "{r}");
    assert_eq!(r.matches("HTTP/1.1").count(), 1, "no second response: {r}");

    // Two different Content-Lengths → 400; an unknown transfer coding → 400.
    let r = httpd::raw_request(
        &addr,
        b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        t,
    );
    assert!(status_line(&r).contains(" 400"), "{r}");
    let r = httpd::raw_request(
        &addr,
        b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        t,
    );
    assert!(status_line(&r).contains(" 400"), "{r}");

    // A client that never finishes its head is cut off after headerReadTimeout.
    let started = std::time::Instant::now();
    let r = httpd::raw_request(
        &addr,
        b"GET /slowloris HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(15),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!r.contains(" 200"), "{r}");

    // One that keeps sending its head a byte at a time, never finishing it, is cut off too:
    // the timeout runs from the head's first wait, not from its latest byte.
    // Between bytes the client waits up to 300 ms (well inside the 2 s timeout) for the
    // connection to end, which is what the test waits for.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let head = format!(
        "GET /trickle HTTP/1.1\r\nHost: x\r\nX-T: {}",
        "a".repeat(100)
    );
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    for b in head.bytes() {
        use std::io::{Read, Write};
        if c.write_all(&[b]).is_err() {
            break;
        }
        let mut got = [0u8; 1024];
        match c.read(&mut got) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&got[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a trickled head was cut off after {:?}",
        started.elapsed()
    );
    assert!(!String::from_utf8_lossy(&rest).contains(" 200"));

    assert_eq!(
        st.hits.load(SeqCst),
        1,
        "none of the bad requests reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (up, st) = counting_upstream();
    let mut sc = secondary(dir.path(), &up.url());
    let url = format!("{}/slow", sc.url());
    let inflight = tokio::spawn(async move { httpd::get(&url, &[]).await });
    let s = st.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "the request in flight", || {
            (s.hits.load(SeqCst) == 1).then_some(())
        })
    })
    .await
    .unwrap();
    let service = sc.service;
    let log_file = sc.log_file.clone();
    let term = std::thread::spawn(move || sc.terminate(Duration::from_secs(30)));
    // Draining: the listener is closed, the request still in flight.
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "drain started", || {
            std::fs::read_to_string(&log_file)
                .unwrap_or_default()
                .contains("draining")
                .then_some(())
        });
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", service)).is_err(),
            "new connections are refused while draining"
        );
    })
    .await
    .unwrap();
    assert!(!inflight.is_finished());
    st.release.notify_one();
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow done");
    let code = tokio::task::spawn_blocking(move || term.join().unwrap())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

/// With `maxConnections: 2`, a third client waits (in the accept backlog) until one of the
/// first two goes away, then is served.
#[test]
fn connection_limit_holds_further_clients_back() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (up, st) = counting_upstream();
    let k = site_key(dir.path(), "tokyo");
    let p = site_key(dir.path(), "paris");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let yaml = format!(
        r#"siteId: tokyo
role: secondary
externalUrl: http://tokyo.example.test
allowInsecure: true
stateDir: {state}
storageRoot: {data}
primary: {{ staticUrl: "{upstream}" }}
keys:
  kid: tokyo.1
  privateKeyFile: {key}
  trusted: [{{ kid: paris.1, publicKey: {pk} }}]
proxy: {{ maxConnections: 2, headerReadTimeout: 60s }}
"#,
        state = dir.path().join("state").display(),
        data = dir.path().join("data").display(),
        upstream = up.url(),
        key = k.file.display(),
        pk = p.public,
    );
    let sc = Sidecar::start(dir.path(), "tokyo", &yaml);
    let addr = format!("127.0.0.1:{}", sc.service);
    let c1 = std::net::TcpStream::connect(&addr).unwrap();
    let _c2 = std::net::TcpStream::connect(&addr).unwrap();
    let mut c3 = std::net::TcpStream::connect(&addr).unwrap();
    c3.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    c3.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        c3.read(&mut buf).is_err(),
        "the third connection must wait while two are open"
    );
    assert_eq!(st.hits.load(SeqCst), 0);
    drop(c1);
    c3.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = c3.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(st.hits.load(SeqCst), 1);
}

/// One connection carrying plain requests (served by the sidecar's own HTTP/1.1 fast path)
/// and a request with a body (handed to hyper from there on), pipelined in one write: every
/// request reaches the upstream whole and in order, every response comes back in order with
/// its framing, `HEAD` gets no body, and `Connection: close` ends the connection.
#[test]
fn plain_and_body_requests_share_one_pipelined_connection() {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let handler: Handler = Arc::new(move |_peer, req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.uri().path().starts_with("/api/v4/geo/") {
                return respond(404, "no Geo API here");
            }
            let line = format!("{} {}", req.method(), req.uri());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            respond(200, format!("{line} {}", String::from_utf8_lossy(&body)))
        })
    });
    let up = TestServer::start(handler);
    let sc = secondary(dir.path(), &up.url());
    let addr = format!("127.0.0.1:{}", sc.service);
    let plain_then_body = httpd::raw_request(
        &addr,
        b"GET /one?x=1 HTTP/1.1\r\nHost: x\r\n\r\n\
          HEAD /two HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /four HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let responses: Vec<&str> = plain_then_body
        .split("HTTP/1.1 ")
        .filter(|r| !r.is_empty())
        .collect();
    assert_eq!(responses.len(), 4, "{plain_then_body}");
    assert!(responses[0].starts_with("200"), "{}", responses[0]);
    assert!(
        responses[0].ends_with("\r\n\r\nGET /one?x=1 "),
        "{}",
        responses[0]
    );
    assert!(responses[1].starts_with("200"), "{}", responses[1]);
    assert!(
        responses[1].ends_with("\r\n\r\n"),
        "HEAD: no body: {}",
        responses[1]
    );
    assert!(
        responses[2].ends_with("\r\n\r\nPOST /three hello"),
        "{}",
        responses[2]
    );
    assert!(
        responses[3].ends_with("\r\n\r\nGET /four "),
        "{}",
        responses[3]
    );
    assert!(
        responses[3]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        responses[3]
    );

    // The other way round: a body first (hyper from the start), then plain requests.
    let body_then_plain = httpd::raw_request(
        &addr,
        b"PUT /five HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /six HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(
        body_then_plain.contains("\r\n\r\nPUT /five abc"),
        "{body_then_plain}"
    );
    assert!(
        body_then_plain.ends_with("\r\n\r\nGET /six "),
        "{body_then_plain}"
    );
}
