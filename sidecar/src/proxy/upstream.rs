//! The upstream side of the reverse proxy: a pooled hyper client, streaming in both
//! directions, timeouts, one retry of an idempotent request on a stale pooled connection, and
//! HTTP Upgrade (WebSocket) tunnelling.

use crate::proxy::headers;
use axum::body::Body;
use bytes::Bytes;
use geoforge_crds::config::ProxyTuning;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// Why an upstream request failed (the caller turns it into a 502/503, never a 500).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no response head within {0:?} after the request was sent")]
    Timeout(Duration),
    #[error("{0}")]
    Other(String),
    #[error("bad upstream URL: {0}")]
    BadUrl(String),
}

impl UpstreamError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Other(_) => "io",
            UpstreamError::BadUrl(_) => "bad_url",
        }
    }
}

/// The connector: plain TCP for `http://`, rustls for `https://` (cross-site URLs are https
/// unless `allowInsecure`). Server certificates are checked against the system's roots
/// (`SSL_CERT_FILE` / `SSL_CERT_DIR` select another bundle, e.g. a private CA).
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Builds the [`Connector`] (shared by the proxy and the secondary's Geo API client).
pub fn connector(connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .unwrap_or_else(|e| {
            tracing::warn!(
                "no system CA certificates ({e}): https upstreams will fail verification"
            );
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        })
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

type PooledClient = Client<Connector, Body>;

thread_local! {
    /// This thread's connection pools, by [`Upstream::id`].
    static POOLS: std::cell::RefCell<Vec<(u64, PooledClient)>> = const { std::cell::RefCell::new(Vec::new()) };
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A pooled HTTP/1.1 client to upstreams (the primary, or the forge).
///
/// One pool per thread: the service port runs one single-threaded runtime per core
/// ([`crate::proxy::server`]), and a connection's hyper task lives on the runtime that
/// opened it, so a per-thread pool keeps a request and its upstream connection on one
/// thread (no cross-thread wake-ups per request).
#[derive(Clone)]
pub struct Upstream {
    id: u64,
    tls: Connector,
    tuning: Arc<ProxyTuning>,
}

impl Upstream {
    pub fn new(t: &ProxyTuning) -> Upstream {
        Upstream {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tls: connector(t.connect_timeout),
            tuning: Arc::new(t.clone()),
        }
    }

    /// Sends on this thread's pool for this upstream (created on first use).
    fn request(&self, req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            let i = match pools.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    let t = &self.tuning;
                    let client = Client::builder(TokioExecutor::new())
                        .pool_timer(TokioTimer::new())
                        .timer(TokioTimer::new())
                        .pool_idle_timeout(t.pool_idle_timeout)
                        .pool_max_idle_per_host(256)
                        .http1_max_buf_size(t.max_header_bytes.max(8192) * 2)
                        .build(self.tls.clone());
                    pools.push((self.id, client));
                    pools.len() - 1
                }
            };
            pools[i].1.request(req)
        })
    }

    /// A plain request (discovery polls).
    pub async fn send_simple(
        &self,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        self.send_once(req).await
    }

    /// Forwards `req` (already cleaned at ingress, forwarding headers set) to `base` + its path.
    /// Removes hop-by-hop headers both ways, sets `Host` to the upstream, streams bodies, and
    /// tunnels an accepted Upgrade.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        base: &url::Url,
    ) -> Result<Response<Body>, UpstreamError> {
        let upgrade = headers::upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        headers::remove_hop_by_hop(req.headers_mut());
        if let Some(proto) = &upgrade {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, proto.clone());
        }
        *req.uri_mut() = join_uri(base, req.uri())?;
        *req.version_mut() = Version::HTTP_11;
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_str(&authority).map_err(|e| UpstreamError::BadUrl(e.to_string()))?,
        );

        // A request without a body that is safe to repeat can be retried once when a pooled
        // connection turns out to be dead (the upstream closed it as we reused it).
        let retry = (is_idempotent(req.method()) && req.body().size_hint().exact() == Some(0))
            .then(|| {
                let mut r = Request::new(Body::empty());
                *r.method_mut() = req.method().clone();
                *r.uri_mut() = req.uri().clone();
                *r.version_mut() = req.version();
                *r.headers_mut() = req.headers().clone();
                r
            })
            .filter(|_| upgrade.is_none());

        let resp = match self.send_once(req).await {
            Ok(r) => r,
            Err(UpstreamError::Other(e)) if retry.is_some() => {
                tracing::debug!(
                    "upstream request failed on a reused connection ({e}); retrying once"
                );
                self.send_once(retry.expect("checked")).await?
            }
            Err(e) => return Err(e),
        };
        let mut resp = resp;
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(UpstreamError::Other(
                    "upstream switched protocols without being asked".into(),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            tracing::debug!("upgraded connection ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("upgrade failed: {e}"),
                }
            });
            let (mut parts, _) = resp.into_parts();
            let proto = parts.headers.get(header::UPGRADE).cloned();
            headers::remove_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(p) = proto.or(upgrade) {
                parts.headers.insert(header::UPGRADE, p);
            }
            return Ok(Response::from_parts(parts, Body::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    /// Sends once; the response head must arrive within `header_read_timeout` of the request
    /// body having been sent (uploads are paced by the client, not timed here).
    async fn send_once(
        &self,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let (tx, rx) = oneshot::channel::<()>();
        let req = req.map(|b| {
            Body::new(NotifyEnd {
                inner: b,
                tx: Some(tx),
            })
        });
        let fut = self.request(req);
        tokio::pin!(fut);
        let limit = self.tuning.header_read_timeout;
        let deadline = async move {
            let _ = rx.await;
            tokio::time::sleep(limit).await;
        };
        tokio::select! {
            r = &mut fut => r.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    UpstreamError::Other(error_chain(&e))
                }
            }),
            _ = deadline => Err(UpstreamError::Timeout(limit)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// `base` (scheme, authority and an optional path prefix) joined with the request's path and query.
pub fn join_uri(base: &url::Url, req: &Uri) -> Result<Uri, UpstreamError> {
    let prefix = base.path().trim_end_matches('/');
    let pq = req.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let host = base
        .host_str()
        .ok_or_else(|| UpstreamError::BadUrl("no host".into()))?;
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let authority = match base.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    format!("{}://{authority}{prefix}{pq}", base.scheme())
        .parse()
        .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl(e.to_string()))
}

/// A request body that signals when it has been sent completely (or dropped).
struct NotifyEnd {
    inner: Body,
    tx: Option<oneshot::Sender<()>>,
}

impl HttpBody for NotifyEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r
            && let Some(tx) = self.tx.take()
        {
            let _ = tx.send(());
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_join() {
        let base = url::Url::parse("http://127.0.0.1:9000/prefix/").unwrap();
        let u = join_uri(&base, &"/a/b?c=d".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:9000/prefix/a/b?c=d");
        let base = url::Url::parse("http://[::1]:9000").unwrap();
        let u = join_uri(&base, &"/x".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://[::1]:9000/x");
    }
}
