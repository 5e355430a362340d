//! The upstream side of the reverse proxy: a pooled hyper client, streaming in both
//! directions, timeouts, one retry of an idempotent request on a stale pooled connection, and
//! HTTP Upgrade (WebSocket) tunnelling.

use crate::proxy::coarse_timer;
use crate::proxy::headers;
use crate::proxy::pool;
use axum::body::Body;
use bytes::Bytes;
use geoforge_crds::config::ProxyTuning;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
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

/// Where proxied requests go: an upstream URL digested once (not per request) into the pool
/// key, the `Host` value, the URI the connector dials and the path prefix.
#[derive(Clone, Debug)]
pub struct UpstreamBase {
    url: url::Url,
    /// `scheme://host:port`: the pool key and the URI the connector dials.
    origin: Uri,
    host: HeaderValue,
    /// The URL's path without its trailing `/` (empty for most upstreams).
    prefix: String,
}

impl UpstreamBase {
    pub fn new(url: &url::Url) -> Result<UpstreamBase, UpstreamError> {
        let host = url
            .host_str()
            .ok_or_else(|| UpstreamError::BadUrl("no host".into()))?;
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let origin: Uri = format!("{}://{authority}/", url.scheme())
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl(e.to_string()))?;
        Ok(UpstreamBase {
            host: HeaderValue::from_str(&authority)
                .map_err(|e| UpstreamError::BadUrl(e.to_string()))?,
            prefix: url.path().trim_end_matches('/').to_string(),
            origin,
            url: url.clone(),
        })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The request target sent upstream (origin form: the prefix, then the request's path
    /// and query).
    fn origin_form(&self, req: &Uri) -> Result<Uri, UpstreamError> {
        let Some(pq) = req.path_and_query() else {
            return Ok(Uri::from_static("/"));
        };
        if self.prefix.is_empty() {
            return Ok(Uri::from(pq.clone()));
        }
        format!("{}{pq}", self.prefix)
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl(e.to_string()))
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A pooled HTTP/1.1 client to upstreams (the primary, or the forge).
///
/// Connections are hyper's `client::conn::http1` driven by one task each; the pool is ours
/// ([`pool`]) and per thread: the service port runs one single-threaded runtime per core
/// ([`crate::proxy::server`]), and a connection's task lives on the runtime that opened it,
/// so a request and its upstream connection stay on one thread. Owning the pool (rather
/// than hyper-util's) saves a task spawn, a channel and a lock per request: a connection
/// goes back to the idle list when the response body has ended.
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

    /// A plain request with an absolute URI (discovery polls).
    pub async fn send_simple(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let base = UpstreamBase::new(
            &url::Url::parse(&req.uri().to_string())
                .map_err(|e| UpstreamError::BadUrl(e.to_string()))?,
        )?;
        // the URL's own path is the request's, not a prefix
        *req.uri_mut() = req
            .uri()
            .path_and_query()
            .map_or(Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        req.headers_mut().insert(header::HOST, base.host.clone());
        self.send(req, &base, false).await
    }

    /// Forwards `req` (already cleaned at ingress, forwarding headers set) to `base` + its path.
    /// Removes hop-by-hop headers both ways, sets `Host` to the upstream, streams bodies, and
    /// tunnels an accepted Upgrade.
    pub async fn forward(
        &self,
        mut req: Request<Body>,
        base: &UpstreamBase,
    ) -> Result<Response<Body>, UpstreamError> {
        let upgrade = headers::upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        headers::remove_hop_by_hop(req.headers_mut());
        if let Some(proto) = &upgrade {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, proto.clone());
        }
        *req.uri_mut() = base.origin_form(req.uri())?;
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut().insert(header::HOST, base.host.clone());

        // A request without a body that is safe to repeat can be sent again when a pooled
        // connection turns out to be dead (the upstream closed it as we reused it).
        let replayable =
            upgrade.is_none() && is_idempotent(req.method()) && req.body().is_end_stream();
        let resp = self.send(req, base, replayable).await?;
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

    /// Sends on a pooled connection, or a new one. A request that never left (the connection
    /// closed before hyper wrote it) is sent again on a new connection whatever its method;
    /// a `replayable` one also when a reused connection failed under it.
    async fn send(
        &self,
        req: Request<Body>,
        base: &UpstreamBase,
        replayable: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (conn, reused) = match self.checkout(base).await {
            Some(conn) => (conn, true),
            // boxed: a dial is rare and its future large (moved with every request's otherwise)
            None => (Box::pin(self.connect(base)).await?, false),
        };
        let copy = (replayable && reused).then(|| bodiless_copy(&req));
        let req = match self.send_on(conn, req, base).await {
            Ok(r) => return Ok(r),
            Err(Failed::Unsent(req, e)) => {
                tracing::debug!("upstream connection closed before the request was sent ({e})");
                *req
            }
            Err(Failed::Error(UpstreamError::Other(e))) => match copy {
                Some(copy) => {
                    tracing::debug!(
                        "upstream request failed on a reused connection ({e}); retrying once"
                    );
                    copy
                }
                None => return Err(UpstreamError::Other(e)),
            },
            Err(Failed::Error(e)) => return Err(e),
        };
        let conn = Box::pin(self.connect(base)).await?;
        Box::pin(self.send_on(conn, req, base))
            .await
            .map_err(|f| match f {
                Failed::Unsent(_, e) => UpstreamError::Other(e),
                Failed::Error(e) => e,
            })
    }

    /// Sends once; the response head must arrive within `header_read_timeout` of the request
    /// body having been sent (uploads are paced by the client, not timed here), give or take
    /// the I/O thread's coarse timer tick.
    async fn send_on(
        &self,
        mut conn: SendRequest<Body>,
        req: Request<Body>,
        base: &UpstreamBase,
    ) -> Result<Response<PooledBody>, Failed> {
        let limit = self.tuning.header_read_timeout;
        // A bodiless request is timed from now; one with a body from its last byte.
        let (req, rx) = if req.body().is_end_stream() {
            (req, None)
        } else {
            let (tx, rx) = oneshot::channel::<()>();
            let req = req.map(|inner| {
                Body::new(NotifyEnd {
                    inner,
                    tx: Some(tx),
                })
            });
            (req, Some(rx))
        };
        let fut = conn.try_send_request(req);
        let deadline = async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            coarse_timer::Deadline::after(limit).await;
        };
        let resp = tokio::select! {
            r = fut => r,
            // Dropping the request future makes hyper close the connection.
            _ = deadline => return Err(Failed::Error(UpstreamError::Timeout(limit))),
        };
        match resp {
            Ok(resp) => {
                // A connection that switched protocols belongs to the tunnel, not the pool.
                let checkin = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| {
                    pool::Checkin::new(
                        self.id,
                        base.origin.clone(),
                        conn,
                        self.tuning.pool_idle_timeout,
                    )
                });
                Ok(resp.map(|b| PooledBody::new(b, checkin)))
            }
            Err(mut e) => {
                let msg = error_chain(e.error());
                match e.take_message() {
                    Some(req) => Err(Failed::Unsent(Box::new(req), msg)),
                    None => Err(Failed::Error(UpstreamError::Other(msg))),
                }
            }
        }
    }

    /// A pooled connection to `base` that is ready for a request.
    async fn checkout(&self, base: &UpstreamBase) -> Option<SendRequest<Body>> {
        let t = &self.tuning;
        while let Some(mut conn) = pool::take(self.id, &base.origin, t.pool_idle_timeout) {
            // Back in the pool as soon as its response was read, a connection can be a poll
            // away from ready; one that does not get there in time is dropped.
            if conn.is_ready()
                || matches!(
                    tokio::time::timeout(t.connect_timeout, conn.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Some(conn);
            }
        }
        None
    }

    /// Dials `base` and starts the connection's task on this thread's runtime.
    async fn connect(&self, base: &UpstreamBase) -> Result<SendRequest<Body>, UpstreamError> {
        let io = tower::ServiceExt::oneshot(self.tls.clone(), base.origin.clone())
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(e.as_ref())))?;
        let (conn, driver) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(self.tuning.max_header_bytes.max(8192) * 2)
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(conn)
    }
}

/// How a send failed: with the request still unsent (it may go again on a new connection),
/// or with an error.
enum Failed {
    Unsent(Box<Request<Body>>, String),
    Error(UpstreamError),
}

/// A copy of a request without a body, for its one retry.
fn bodiless_copy(req: &Request<Body>) -> Request<Body> {
    let mut r = Request::new(Body::empty());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// A response body that hands its connection back to the pool once it has been read to the
/// end (dropped early, the connection is dropped and hyper closes it).
pub struct PooledBody {
    inner: hyper::body::Incoming,
    checkin: Option<pool::Checkin>,
    /// The body has yielded its end (a body known empty up front says so through `inner`).
    ended: bool,
}

impl PooledBody {
    fn new(inner: hyper::body::Incoming, checkin: Option<pool::Checkin>) -> PooledBody {
        PooledBody {
            inner,
            checkin,
            ended: false,
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if (self.ended || self.inner.is_end_stream())
            && let Some(c) = self.checkin.take()
        {
            c.put();
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
    fn origin_form_with_and_without_prefix() {
        let base =
            UpstreamBase::new(&url::Url::parse("http://127.0.0.1:9000/prefix/").unwrap()).unwrap();
        let u = base.origin_form(&"/a/b?c=d".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "/prefix/a/b?c=d");
        assert_eq!(base.host, "127.0.0.1:9000");
        let base = UpstreamBase::new(&url::Url::parse("http://[::1]:9000").unwrap()).unwrap();
        assert_eq!(base.origin_form(&"/x".parse().unwrap()).unwrap(), "/x");
        assert_eq!(base.host, "[::1]:9000");
        assert_eq!(base.origin.to_string(), "http://[::1]:9000/");
        let abs = base
            .origin_form(&"http://elsewhere/y?z".parse().unwrap())
            .unwrap();
        assert_eq!(abs.to_string(), "/y?z");
    }
}
