//! The service-port server: hyper 1 with automatic HTTP/1.1 / h2c, connection limits,
//! header limits and timeouts, and a graceful drain on shutdown.
//!
//! - request heads larger than `proxy.maxHeaderBytes` → 431 (hyper), malformed → 400 (hyper);
//! - at most `proxy.maxConnections` client connections; further ones wait in the kernel's
//!   accept backlog;
//! - `proxy.headerReadTimeout` for a client to send its request head; hyper also times the
//!   wait for the *next* head on a keep-alive HTTP/1.1 connection with it, so idle HTTP/1.1
//!   clients are closed after that long (HTTP/2 connections are kept in check with keep-alive
//!   pings);
//! - conflicting `Content-Length`/`Transfer-Encoding` → 400 (see [`crate::proxy::sniff`]);
//! - on shutdown: stop accepting, let in-flight requests finish up to `proxy.shutdownGrace`,
//!   then return (the process exits 0).

use crate::proxy::front::Front;
use crate::proxy::sniff::SniffIo;
use axum::body::Body;
use geoforge_crds::config::ProxyTuning;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Serves `listener` until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    front: Arc<Front>,
    tuning: ProxyTuning,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(tuning.header_read_timeout)
        .max_buf_size(tuning.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(tuning.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    let limit = Arc::new(Semaphore::new(tuning.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let connections = front.metrics().connections.clone();

    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let connections = connections.clone();
        tokio::spawn(async move {
            connections.inc();
            let (stream, conflict) = SniffIo::new(stream);
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let front = front.clone();
                if conflict.is_set() {
                    req.extensions_mut().insert(conflict.clone());
                }
                async move { Ok::<_, Infallible>(front.handle(peer, req.map(Body::new)).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(peer = %peer, "connection: {e}");
            }
            connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        in_flight = graceful.count(),
        grace = ?tuning.shutdown_grace,
        "stopped accepting; draining"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained"),
        _ = tokio::time::sleep(tuning.shutdown_grace) => {
            tracing::warn!("shutdown grace elapsed with requests in flight; closing them");
        }
    }
    Ok(())
}
