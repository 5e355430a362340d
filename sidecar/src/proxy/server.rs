//! The service-port server: plain HTTP/1.1 requests on the sidecar's own fast path
//! ([`h1_server`]) and everything else (bodies, upgrades, h2c, bad heads) on hyper 1 with
//! automatic HTTP/1.1 / h2c; connection limits, header limits and timeouts, and a graceful
//! drain on shutdown.
//!
//! - request heads larger than `proxy.maxHeaderBytes` → 431 (hyper), malformed → 400 (hyper;
//!   the fast path hands such heads to it);
//! - at most `proxy.maxConnections` client connections; further ones wait in the kernel's
//!   accept backlog;
//! - `proxy.headerReadTimeout` for a client to send its request head (the fast path times
//!   every head the same way); hyper also times the
//!   wait for the *next* head on a keep-alive HTTP/1.1 connection with it, so idle HTTP/1.1
//!   clients are closed after that long (HTTP/2 connections are kept in check with keep-alive
//!   pings). It runs on each I/O thread's coarse timer ([`coarse_timer`], ± 100 ms);
//! - conflicting `Content-Length`/`Transfer-Encoding` → 400 (see [`crate::proxy::sniff`]);
//! - on shutdown: stop accepting, let in-flight requests finish up to `proxy.shutdownGrace`,
//!   then return (the process exits 0).
//!
//! **Threads.** Connections are served by `proxy.ioThreads` single-threaded runtimes (one
//! per CPU by default), each connection pinned to one of them for its whole life: the
//! acceptor hands a new connection to the worker with the fewest open connections. A request,
//! its upstream connection (pools are per thread, see [`crate::proxy::upstream`]) and both
//! sockets' readiness then stay on one thread, without the cross-thread wake-ups and work
//! stealing of the shared multi-threaded runtime: measured 30 µs of CPU per proxied request
//! instead of 45 (BENCHMARKS.md). The acceptor balances by count rather than letting the
//! kernel hash connections to `SO_REUSEPORT` listeners, which left one thread with more
//! connections and tripled the p99.
//!
//! **Yield before sleeping.** An I/O thread that runs out of work calls `sched_yield` before
//! every `proxy.yieldEvery`th sleep in `epoll_wait` (default 4). On a busy machine the
//! clients and the upstream are then run first on its CPU while it stays runnable, instead of
//! it sleeping and being woken (and often preempting the very process that woke it) once per
//! burst of events: that cuts the p99 (BENCHMARKS.md, fourth round: 0.72–0.83× nginx's
//! instead of 1.09–1.13× with 64 connections on 2 CPUs). Yielding at *every* sleep also hands
//! the clients and the upstream their work in smaller batches, so they wake and poll more
//! often per request: with `perf stat` (`bench/proxy-sched.sh`), wrk made 0.83–0.94
//! `epoll_wait`s per request behind a sidecar that always yields against 0.66–0.67 behind one
//! that never does, and the upstream 0.45 against 0.39, which showed as 6 % fewer requests/s
//! (0.94× head to head). Every fourth sleep kept most of both: 1.04× nginx's requests/s and
//! 0.69× its p99, against 1.01× and 0.68× yielding every time and 1.06× and 0.79× never
//! (BENCHMARKS.md, seventh round). On an idle CPU the call returns at once: one system call
//! per yield.

use crate::proxy::coarse_timer;
use crate::proxy::drain::{Drain, Graceful};
use crate::proxy::front::{Front, Writer};
use crate::proxy::h1_server;
use crate::proxy::metrics;
use crate::proxy::sniff::SniffIo;
use axum::body::Body;
use futures::FutureExt;
use geoforge_crds::config::ProxyTuning;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One accepted connection on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
}

/// A connection's place in the limits: its `maxConnections` permit, its count on the worker
/// serving it and in the open-connections gauge, all given back when the connection ends,
/// however it ends.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(
        open: Arc<AtomicUsize>,
        gauge: prometheus_client::metrics::gauge::Gauge,
        permit: OwnedSemaphorePermit,
    ) -> Slot {
        open.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Slot {
            open,
            gauge,
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// An I/O worker as the acceptor sees it.
struct Worker {
    tx: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

/// How many I/O threads `proxy.ioThreads` asks for (0 = one per available CPU).
pub fn io_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Serves `listener` until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    front: &'static Front,
    tuning: ProxyTuning,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let threads = io_threads(tuning.io_threads);
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        workers.push(start_worker(i, front, tuning.clone())?);
    }
    let limit = Arc::new(Semaphore::new(tuning.max_connections.max(1)));
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
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer, "cannot hand the connection over: {e}");
                continue;
            }
        };
        let w = workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .expect("at least one worker");
        let slot = Slot::new(w.open.clone(), connections.clone(), permit);
        if w.tx.send(Accepted { stream, peer, slot }).is_err() {
            tracing::error!("an I/O worker has stopped; closing the connection");
        }
    }
    drop(listener);
    tracing::info!(grace = ?tuning.shutdown_grace, "stopped accepting; draining");
    // Every worker starts draining now (its channel closes), so the drain takes one
    // `shutdownGrace` in all, not one per worker.
    let (senders, done): (Vec<_>, Vec<_>) = workers.into_iter().map(|w| (w.tx, w.done)).unzip();
    drop(senders);
    for d in done {
        let _ = d.await;
    }
    Ok(())
}

/// Whether an I/O thread that runs out of work yields its CPU before it sleeps: on every
/// `proxy.yieldEvery`th time (see "Yield before sleeping" in the module docs). Each I/O
/// thread's runtime has its own, so the count is never shared between threads.
#[derive(Debug)]
pub struct IdleYield {
    every: u32,
    parks: AtomicU32,
}

impl IdleYield {
    pub fn new(every: u32) -> IdleYield {
        IdleYield {
            every,
            parks: AtomicU32::new(0),
        }
    }

    /// Counts one time the thread ran out of work; true when it should yield this time.
    pub fn on_park(&self) -> bool {
        if self.every == 0 {
            return false;
        }
        let n = self.parks.load(Ordering::Relaxed) + 1;
        let n = if n >= self.every { 0 } else { n };
        self.parks.store(n, Ordering::Relaxed);
        n == 0
    }
}

/// Starts one I/O thread; it serves what it is handed until the acceptor drops its sender,
/// then drains its connections for up to `shutdownGrace`.
fn start_worker(i: usize, front: &'static Front, tuning: ProxyTuning) -> anyhow::Result<Worker> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Accepted>();
    let (done_tx, done) = oneshot::channel();
    let open = Arc::new(AtomicUsize::new(0));
    let idle = IdleYield::new(tuning.yield_every);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Out of work, the thread offers its CPU (sched_yield) before every
        // `yieldEvery`th sleep in epoll: see "Yield before sleeping" in the module docs.
        .on_thread_park(move || {
            if idle.on_park() {
                std::thread::yield_now()
            }
        })
        .build()?;
    std::thread::Builder::new()
        .name(format!("geo-io-{i}"))
        .spawn(move || {
            rt.block_on(async move {
                tokio::spawn(coarse_timer::run_ticker());
                metrics::batch_on_this_thread();
                tokio::spawn(metrics::run_flusher());
                let builder = http_builder(&tuning);
                let limits = h1_server::Limits {
                    max_header_bytes: tuning.max_header_bytes,
                    header_read_timeout: tuning.header_read_timeout,
                };
                let drain = Drain::new();
                while let Some(a) = rx.recv().await {
                    let Accepted { stream, peer, slot } = a;
                    let stream = match tokio::net::TcpStream::from_std(stream) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("cannot register a connection: {e}");
                            continue;
                        }
                    };
                    let drain = drain.clone();
                    let builder = builder.clone();
                    tokio::spawn(async move {
                        let life = serve_connection(stream, peer, front, builder, limits, &drain);
                        if let Err(e) = drain.watch(Connection { life }).await {
                            tracing::debug!(peer = %peer, "connection: {e}");
                        }
                        drop(slot);
                    });
                }
                tracing::debug!(
                    worker = i,
                    in_flight = drain.open(),
                    "draining"
                );
                tokio::select! {
                    _ = drain.drained() => {},
                    _ = tokio::time::sleep(tuning.shutdown_grace) => {
                        tracing::warn!("shutdown grace elapsed with requests in flight; closing them");
                    }
                }
                metrics::flush_thread();
            });
            let _ = done_tx.send(());
        })?;
    Ok(Worker { tx, open, done })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection's whole life: plain HTTP/1.1 requests on the fast path ([`h1_server`]), then,
/// from the first request that is not plain (or the h2c preface), hyper with the bytes read.
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    front: &'static Front,
    builder: auto::Builder<TokioExecutor>,
    limits: h1_server::Limits,
    drain: &Drain,
) -> Result<(), BoxError> {
    let prefix = match h1_server::serve(&mut stream, peer, front, limits, drain).await? {
        h1_server::Next::Closed => return Ok(()),
        h1_server::Next::Handover(prefix) => prefix,
    };
    // hyper reads the bytes already read first, then the socket. The sniffer sees the
    // connection from the handed-over head on: the fast path took no request with a body, so
    // no message boundary lies behind it.
    let (read, write) = stream.into_split();
    let stream = tokio::io::join(std::io::Cursor::new(prefix).chain(read), write);
    let (io, conflict) = SniffIo::new(stream);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        if conflict.is_set() {
            req.extensions_mut().insert(conflict.clone());
        }
        // The request is looked at and let go of here, in the call: hyper may read again
        // before it polls the future, and its read buffer is reused only once nothing refers
        // to the last head (else it allocates a new one per request).
        front
            .handle(peer, req.map(Body::new), Writer::MapOnly)
            .map(Ok::<_, Infallible>)
    });
    let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), svc));
    let mut asked = false;
    poll_fn(|cx| {
        if !asked && drain.is_draining() {
            asked = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await
}

pin_project_lite::pin_project! {
    /// A connection for the [`Drain`]. It reads the drain's state itself: the fast path between
    /// requests, the hyper part to pass it on to hyper.
    struct Connection<F> {
        #[pin]
        life: F,
    }
}

impl<F: Future> Future for Connection<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        self.project().life.poll(cx)
    }
}

impl<F: Future> Graceful for Connection<F> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        // Nothing to do: the drain polls the connection right after asking, and it sees the
        // drain has begun.
    }
}

fn http_builder(tuning: &ProxyTuning) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(coarse_timer::CoarseTimer)
        .header_read_timeout(tuning.header_read_timeout)
        .max_buf_size(tuning.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(tuning.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    builder
}

#[cfg(test)]
mod tests {
    use super::{IdleYield, io_threads};

    #[test]
    fn idle_yield_comes_every_nth_park() {
        let pattern = |every| {
            let y = IdleYield::new(every);
            (0..6).map(|_| y.on_park()).collect::<Vec<_>>()
        };
        assert_eq!(pattern(0), [false; 6]);
        assert_eq!(pattern(1), [true; 6]);
        assert_eq!(pattern(2), [false, true, false, true, false, true]);
        assert_eq!(pattern(3), [false, false, true, false, false, true]);
    }

    #[test]
    fn io_threads_default_to_the_cpus() {
        assert_eq!(io_threads(3), 3);
        let auto = io_threads(0);
        assert!(auto >= 1);
        assert_eq!(
            auto,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
}
