//! The upstream side of the reverse proxy: pooled HTTP/1.1 connections ([`h1`]), streaming in
//! both directions, timeouts, one retry of an idempotent request on a stale pooled connection,
//! and HTTP Upgrade (WebSocket) tunnelling.

use crate::proxy::h1::{self, Conn, Fate, Hop, Passthrough, RawSlot, ReqFraming, RequestHead};
use crate::proxy::headers;
use crate::proxy::pool;
use axum::body::Body;
use bytes::Bytes;
use geoforge_crds::config::ProxyTuning;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Why an upstream request failed (the caller turns it into a 502/503, never a 500).
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The origin's key in the connection pool.
    origin_key: pool::OriginKey,
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
            origin_key: pool::OriginKey::of(&origin),
            origin,
            url: url.clone(),
        })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }
}

/// The request target sent upstream after the base's path prefix: the request's path and
/// query (origin form, also for a request that arrived in absolute form).
fn target(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A pooled HTTP/1.1 client to upstreams (the primary, or the forge).
///
/// The exchange is ours ([`h1`]) and runs in the request's own task; the pool is ours too
/// ([`pool`]) and per thread: the service port runs one single-threaded runtime per core
/// ([`crate::proxy::server`]), so a request and its upstream connection stay on one thread.
/// A connection goes back to the idle list when its response body has been read to the end.
#[derive(Clone)]
pub struct Upstream {
    id: u64,
    tls: Connector,
    tuning: Arc<ProxyTuning>,
}

/// A response from upstream whose body reads from the connection it came on.
pub type PooledBody = h1::ResponseBody<pool::Checkin>;

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
        req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let base = UpstreamBase::new(
            &url::Url::parse(&req.uri().to_string())
                .map_err(|e| UpstreamError::BadUrl(e.to_string()))?,
        )?;
        let (parts, body) = req.into_parts();
        // the URL's own path is the request's, not a prefix
        let out = Outgoing::new(&base, "", parts, body, None, Hop::default(), None);
        let x = self.send(&base, out).await?;
        if x.head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(unasked_switch());
        }
        self.response(&base, x, None)
    }

    /// Forwards `req` (already cleaned at ingress) with what `hop` adds to `base` + its path.
    /// Removes hop-by-hop headers both ways, sets `Host` to the upstream, streams bodies, and
    /// tunnels an accepted Upgrade. With `passthrough`, the response's end-to-end header lines
    /// that it allows are left in its slot as they were sent ([`h1::RawLines`]), not in the
    /// response's map.
    ///
    /// The request head is written when this is called, not when the future first runs: the
    /// future then holds the head's bytes instead of the request, and stays small. (A
    /// request's future is moved whole, at its full size, into each caller's future and into
    /// the connection's; with the request kept at every level it was 5 KiB, and copying it
    /// was a tenth of the proxy's user time.)
    pub fn forward<'a, B>(
        &'a self,
        mut req: Request<Body>,
        base: B,
        hop: Hop<'_>,
        passthrough: Option<(Passthrough, &'a RawSlot)>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + Send + use<'a, B>
    where
        B: std::ops::Deref<Target = UpstreamBase> + Send + Sync + 'a,
    {
        let upgrade = headers::upgrade_protocol(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let out = Outgoing::new(
            &base,
            &base.prefix,
            parts,
            body,
            upgrade.as_ref(),
            hop,
            passthrough.map(|(p, _)| p),
        );
        let slot = passthrough.map(|(_, s)| s);
        // Boxed: the exchange's state is most of a request's future (a kilobyte), which every
        // caller's combinator and the connection's loop would otherwise copy as they take it
        // in; one allocation costs less than those copies.
        Box::pin(async move {
            let x = self.send(&base, out).await?;
            if x.head.status == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_upgrade) = client_upgrade else {
                    return Err(unasked_switch());
                };
                return Ok(tunnel(x.conn, x.head, client_upgrade, upgrade));
            }
            // hop-by-hop headers were left out of the parsed head
            Ok(self.response(&base, x, slot)?.map(Body::new))
        })
    }

    /// The response of an exchange, its body reading from its connection; raw lines go to
    /// `slot`, or else into the map.
    fn response(
        &self,
        base: &UpstreamBase,
        x: Exchanged,
        slot: Option<&RawSlot>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let Exchanged {
            conn,
            head,
            sent_whole,
            is_head,
        } = x;
        let (framing, must_close) = h1::response_framing(is_head, &head)
            .map_err(|e| UpstreamError::Other(format!("bad response: {e}")))?;
        let checkin = (head.keep_alive && sent_whole && !must_close)
            .then(|| pool::Checkin::new(self.id, base.origin_key, self.tuning.pool_idle_timeout));
        let mut resp = Response::new(h1::ResponseBody::new(conn, framing, checkin));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        if let Some(raw) = head.raw {
            match slot {
                Some(slot) => slot.put(raw),
                None => raw.append_to(resp.headers_mut()),
            }
        }
        Ok(resp)
    }

    /// Sends `out` to `base`: one exchange on a pooled connection, or a new one. A request
    /// that never left (writing its head failed) is sent again on a new connection whatever
    /// its method; a replayable one also when a reused connection failed under it before any
    /// answer.
    async fn send(&self, base: &UpstreamBase, out: Outgoing) -> Result<Exchanged, UpstreamError> {
        let Outgoing {
            head,
            mut body,
            framing,
            replayable,
            is_head,
            passthrough,
        } = out;
        let t = &self.tuning;
        let (mut conn, reused) = match pool::take(self.id, base.origin_key, t.pool_idle_timeout) {
            Some(conn) => (conn, true),
            // boxed: a dial is rare and its future large (moved with every request's otherwise)
            None => (Box::pin(self.connect(base)).await?, false),
        };
        let exchanged = |conn, (head, sent_whole)| Exchanged {
            conn,
            head,
            sent_whole,
            is_head,
        };
        let failure = match self
            .exchange(&mut conn, &head, &mut body, framing, passthrough)
            .await
        {
            Ok(x) => return Ok(exchanged(conn, x)),
            Err(f) => f,
        };
        let again = reused
            && match failure.fate {
                Fate::Unsent => true,
                Fate::Sent => replayable,
                Fate::Final => false,
            };
        if !again {
            return Err(exchange_error(failure.error));
        }
        tracing::debug!(
            "upstream request failed on a reused connection ({}); sending it again on a new one",
            failure.error
        );
        drop(conn);
        let mut conn = Box::pin(self.connect(base)).await?;
        let x = Box::pin(self.exchange(&mut conn, &head, &mut body, framing, passthrough))
            .await
            .map_err(|f| exchange_error(f.error))?;
        Ok(exchanged(conn, x))
    }

    /// One exchange on `conn` with this upstream's limits.
    async fn exchange(
        &self,
        conn: &mut Conn,
        head: &Bytes,
        body: &mut Body,
        framing: ReqFraming,
        passthrough: Option<Passthrough>,
    ) -> Result<(h1::Head, bool), h1::Failure> {
        let t = &self.tuning;
        let max_head = t.max_header_bytes.max(8192) * 2;
        h1::exchange(
            conn,
            head,
            body,
            framing,
            max_head,
            t.header_read_timeout,
            passthrough,
        )
        .await
    }

    /// Dials `base` (TCP, and TLS for `https://`).
    async fn connect(&self, base: &UpstreamBase) -> Result<Conn, UpstreamError> {
        let io = tower::ServiceExt::oneshot(self.tls.clone(), base.origin.clone())
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(e.as_ref())))?;
        Ok(Conn::new(Box::new(TokioIo::new(io))))
    }
}

/// What an exchange left: the connection (its body still to read), the final response head,
/// whether the request body went out whole, and whether the request was a HEAD.
struct Exchanged {
    conn: Conn,
    head: h1::Head,
    sent_whole: bool,
    is_head: bool,
}

/// A request ready to go: its head written (hop-by-hop headers left out; `Host`, the
/// upgrade and what the hop adds set), its body, and what sending it needs to know.
struct Outgoing {
    head: Bytes,
    body: Body,
    framing: ReqFraming,
    /// Without a body and safe to repeat: it can be sent again when a pooled connection
    /// turns out to be dead (the upstream closed it as we reused it).
    replayable: bool,
    is_head: bool,
    passthrough: Option<Passthrough>,
}

impl Outgoing {
    fn new(
        base: &UpstreamBase,
        prefix: &str,
        parts: http::request::Parts,
        body: Body,
        upgrade: Option<&HeaderValue>,
        hop: Hop<'_>,
        passthrough: Option<Passthrough>,
    ) -> Outgoing {
        let framing = ReqFraming::of(&body);
        let head = RequestHead {
            method: &parts.method,
            prefix,
            path_and_query: target(&parts.uri),
            host: &base.host,
            upgrade,
            headers: &parts.headers,
            hop,
            framing,
        }
        .encode();
        Outgoing {
            head,
            body,
            framing,
            replayable: upgrade.is_none()
                && is_idempotent(&parts.method)
                && framing == ReqFraming::Empty,
            is_head: parts.method == Method::HEAD,
            passthrough,
        }
    }
}

/// A 101 to a request that asked for no upgrade.
fn unasked_switch() -> UpstreamError {
    UpstreamError::Other("upstream switched protocols without being asked".into())
}

fn exchange_error(e: h1::ExchangeError) -> UpstreamError {
    match e {
        h1::ExchangeError::Timeout(d) => UpstreamError::Timeout(d),
        e => UpstreamError::Other(e.to_string()),
    }
}

/// Tunnels an accepted Upgrade: the client's upgraded connection and the upstream one, both
/// ways until either side closes. Bytes the upstream sent right after its 101 go first.
fn tunnel(
    conn: Conn,
    head: h1::Head,
    client_upgrade: hyper::upgrade::OnUpgrade,
    asked: Option<HeaderValue>,
) -> Response<Body> {
    tokio::spawn(async move {
        let client = match client_upgrade.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let Conn { mut io, rbuf, .. } = conn;
        if !rbuf.is_empty()
            && let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &rbuf).await
        {
            tracing::debug!("upgraded connection ended: {e}");
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut io).await {
            tracing::debug!("upgraded connection ended: {e}");
        }
    });
    // hop-by-hop headers were left out of the parsed head
    let mut headers = head.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = head.upgrade.or(asked) {
        headers.insert(header::UPGRADE, p);
    }
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = headers;
    resp
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_target_with_and_without_prefix() {
        let head = |base: &UpstreamBase, uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            let h = RequestHead {
                method: &Method::GET,
                prefix: &base.prefix,
                path_and_query: target(&uri),
                host: &HeaderValue::from_static("h"),
                upgrade: None,
                headers: &http::HeaderMap::new(),
                hop: Hop::default(),
                framing: ReqFraming::Empty,
            }
            .encode();
            String::from_utf8(h.to_vec()).unwrap()
        };
        let base =
            UpstreamBase::new(&url::Url::parse("http://127.0.0.1:9000/prefix/").unwrap()).unwrap();
        assert_eq!(
            head(&base, "/a/b?c=d"),
            "GET /prefix/a/b?c=d HTTP/1.1\r\nhost: h\r\n\r\n"
        );
        assert_eq!(base.host, "127.0.0.1:9000");
        let base = UpstreamBase::new(&url::Url::parse("http://[::1]:9000").unwrap()).unwrap();
        assert_eq!(head(&base, "/x"), "GET /x HTTP/1.1\r\nhost: h\r\n\r\n");
        assert_eq!(base.host, "[::1]:9000");
        assert_eq!(base.origin.to_string(), "http://[::1]:9000/");
        // absolute form from the client: only its path and query go upstream
        assert_eq!(
            head(&base, "http://elsewhere/y?z"),
            "GET /y?z HTTP/1.1\r\nhost: h\r\n\r\n"
        );
    }

    /// A request's future is moved whole into its callers' futures and into the
    /// connection's; [`Upstream::forward`] writes the head up front so that its future holds
    /// bytes, not the request, and nothing above it keeps the request twice.
    #[test]
    fn a_forward_holds_the_written_head_not_the_request() {
        let u = Upstream::new(&ProxyTuning::default());
        let base = UpstreamBase::new(&url::Url::parse("http://127.0.0.1:9/").unwrap()).unwrap();
        let fut = u.forward(Request::new(Body::empty()), &base, Hop::default(), None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("forward future: {size} bytes");
        assert!(size <= 1024, "the forward future grew to {size} bytes");
    }
}
