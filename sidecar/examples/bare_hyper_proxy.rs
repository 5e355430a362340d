//! A bare hyper 1 reverse proxy, for `bench/proxy.sh` (`FLOOR=1`) and
//! `bench/proxy-instructions.sh`: the least a proxy with hyper on both sides can do per
//! request, with the sidecar's thread layout (one single-threaded runtime per CPU, connections
//! handed out by one acceptor) and allocator.
//!
//! It forwards every request to one upstream over pooled HTTP/1.1 connections (hyper's client)
//! and does nothing else: no header hygiene, no routing, no metrics, no logs, no timeouts, no
//! retries. Not a product. It was the floor of the sidecar's stack until the sidecar's upstream
//! side became its own inline HTTP/1.1 exchange (`proxy/h1.rs`), which costs less than hyper's
//! client task; now the sidecar's full request path is measured against it (BENCHMARKS.md).
//!
//!     cargo run --release --example bare_hyper_proxy -- 127.0.0.1:8080 127.0.0.1:9000 [threads]

use http::{HeaderValue, Request, Uri, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::convert::Infallible;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

thread_local! {
    static IDLE: RefCell<Vec<SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

async fn upstream_conn(upstream: &str) -> std::io::Result<SendRequest<Incoming>> {
    if let Some(mut c) = IDLE.with_borrow_mut(|v| v.pop())
        && c.ready().await.is_ok()
    {
        return Ok(c);
    }
    let io = tokio::net::TcpStream::connect(upstream).await?;
    io.set_nodelay(true)?;
    let (c, driver) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(driver);
    Ok(c)
}

async fn forward(
    upstream: &'static str,
    host: HeaderValue,
    mut req: Request<Incoming>,
) -> Result<hyper::Response<Incoming>, std::io::Error> {
    let mut c = upstream_conn(upstream).await?;
    *req.uri_mut() = req
        .uri()
        .path_and_query()
        .map_or(Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    req.headers_mut().insert(header::HOST, host);
    let resp = c.send_request(req).await.map_err(std::io::Error::other)?;
    // back to the idle list at once: `ready()` waits for the body to be read before reuse
    IDLE.with_borrow_mut(|v| v.push(c));
    Ok(resp)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen address");
    let upstream: &'static str = args.next().expect("upstream address").leak();
    let threads: usize = args.next().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t.parse().expect("threads"),
    );
    let host = HeaderValue::from_static(upstream);
    let listener = std::net::TcpListener::bind(&listen)?;
    let mut workers = Vec::new();
    for _ in 0..threads {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let host = host.clone();
        std::thread::spawn(move || {
            rt.block_on(async move {
                while let Some(s) = rx.recv().await {
                    let Ok(s) = tokio::net::TcpStream::from_std(s) else {
                        continue;
                    };
                    let host = host.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let host = host.clone();
                            async move {
                                Ok::<_, Infallible>(match forward(upstream, host, req).await {
                                    Ok(r) => r.map(http_body_util::Either::Left),
                                    Err(_) => hyper::Response::builder()
                                        .status(502)
                                        .body(http_body_util::Either::Right(
                                            http_body_util::Empty::<bytes::Bytes>::new(),
                                        ))
                                        .expect("a valid response"),
                                })
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        });
        workers.push(tx);
    }
    for (i, s) in listener.incoming().enumerate() {
        let s = s?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let _ = workers[i % threads].send(s);
    }
    Ok(())
}
