//! The accelerator: decides, per Git request on a secondary, whether the replica answers it,
//! and learns from the primary's answers (see the table in [`crate::accel`]).
//!
//! The proxy calls [`Accelerator::intercept`] before proxying a secondary's request and
//! [`Accelerator::complete`] with the proxied (or 503) response. Everything else about the
//! request path stays in [`crate::proxy`].

use super::authcache::{AuthCache, ClientKey, client_key};
use super::local::{UploadPackPool, has_objects};
use super::metrics::AccelMetrics;
use super::{advert, request};
use crate::http_util::Resp;
use crate::items::{RepoMapper, RepoTarget};
use crate::secondary::Secondary;
use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use geoforge_crds::config::SidecarConfig;
use geoforge_crds::geosite::PushRedirect;
use http::{HeaderValue, Method, Request, StatusCode, header};
use sha2::Digest;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Largest `info/refs` / `ls-refs` response captured to learn tips (larger: not cached).
const MAX_ADVERTISEMENT: usize = 8 * 1024 * 1024;

/// What the proxy should do with a request.
pub enum Intercept {
    /// Answered here (the `&str` is the route name for metrics).
    Served(&'static str, Resp),
    /// Proxy this request, then hand the response to [`Accelerator::complete`].
    Proxy(Box<Request<Body>>, Pending),
}

impl Intercept {
    fn proxy(req: Request<Body>, pending: Pending) -> Intercept {
        Intercept::Proxy(Box::new(req), pending)
    }
}

/// What to do with the proxied response.
pub struct Pending {
    kind: PendingKind,
}

enum PendingKind {
    None,
    /// An LFS batch answer: point downloads of synced objects at this site.
    LfsBatch,
    /// `GET info/refs?service=git-upload-pack`: learn the tips; replay if the primary is down.
    InfoRefs {
        key: ClientKey,
        target: RepoTarget,
    },
    /// v2 `command=ls-refs`: learn the tips; replay if the primary is down.
    LsRefs {
        key: ClientKey,
        target: RepoTarget,
        digest: [u8; 32],
    },
    /// A fetch we proxied (the body is kept so it can be served locally if the primary is down).
    Fetch {
        key: ClientKey,
        target: RepoTarget,
        body: Bytes,
        git_protocol: Option<String>,
        reason: &'static str,
    },
    /// A push relayed to the primary: sync the repository once it is acknowledged.
    Push {
        target: RepoTarget,
    },
}

impl Pending {
    fn none() -> Pending {
        Pending {
            kind: PendingKind::None,
        }
    }
}

/// Read acceleration of one secondary instance.
pub struct Accelerator {
    config: Arc<SidecarConfig>,
    mapper: RepoMapper,
    cache: Arc<AuthCache>,
    pool: UploadPackPool,
    secondary: Arc<Secondary>,
    metrics: AccelMetrics,
    signing_key: Arc<geoforge_crds::auth::SigningKey>,
    keyring: Arc<geoforge_crds::auth::KeyRing>,
    /// Set when a proxied request found the primary unreachable; cleared on the next success.
    primary_down: AtomicBool,
}

impl Accelerator {
    pub fn new(
        ctx: &crate::context::SiteContext,
        secondary: Arc<Secondary>,
    ) -> anyhow::Result<Accelerator> {
        let config: Arc<SidecarConfig> = ctx.config.clone();
        let metrics = &ctx.metrics;
        let a = &config.acceleration;
        Ok(Accelerator {
            mapper: RepoMapper::new(&config).map_err(anyhow::Error::msg)?,
            cache: Arc::new(AuthCache::new(a.authorization_ttl, config.max_staleness)),
            pool: {
                let pool = UploadPackPool::new(a.max_upload_packs);
                metrics.register(
                    "geo_accel_upload_pack_queued",
                    "Local upload-pack requests waiting for a slot",
                    pool.queued.clone(),
                );
                metrics.register(
                    "geo_accel_upload_pack_coalesced",
                    "Local fetches answered by joining an identical upload-pack in flight",
                    pool.coalesced.clone(),
                );
                metrics.register(
                    "geo_accel_upload_pack_running",
                    "Local upload-pack processes running",
                    pool.running.clone(),
                );
                pool
            },
            metrics: AccelMetrics::register(metrics),
            secondary,
            signing_key: ctx.signing_key.clone(),
            keyring: ctx.keyring.clone(),
            primary_down: AtomicBool::new(false),
            config,
        })
    }

    /// Before proxying a request of this secondary. `primary_known`: the primary URL is known.
    pub async fn intercept(
        &self,
        req: Request<Body>,
        client: IpAddr,
        primary_known: bool,
    ) -> Intercept {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();

        // LFS downloads from the replica (links minted by `complete` below).
        if path.starts_with(super::lfs::DOWNLOAD_PREFIX)
            && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            return Intercept::Served(
                "lfs_download",
                self.lfs_download(&path, &query, req.headers()).await,
            );
        }
        // Push forwarding (DESIGN §3).
        if let Some(stripped) = strip_push_prefix(&path) {
            let req = with_path(req, &stripped);
            return match self.mapper.map(&stripped) {
                Some(target) => Intercept::proxy(
                    req,
                    Pending {
                        kind: PendingKind::Push { target },
                    },
                ),
                None => Intercept::proxy(req, Pending::none()),
            };
        }
        let Some(target) = self.mapper.map(&path) else {
            return Intercept::proxy(req, Pending::none());
        };
        let git_protocol = req
            .headers()
            .get("git-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let key = client_key(
            req.headers(),
            &self.config.acceleration.credential_headers,
            client,
        );

        match (req.method(), target.rest.as_str()) {
            (&Method::GET, "/info/refs") if query_has(&query, "service", "git-receive-pack") => {
                if let Some(resp) = self.push_redirect(&path, &query) {
                    return Intercept::Served("push_redirect", resp);
                }
                Intercept::proxy(req, Pending::none())
            }
            (&Method::POST, "/info/lfs/objects/batch") if self.config.acceleration.enabled => {
                Intercept::proxy(
                    req,
                    Pending {
                        kind: PendingKind::LfsBatch,
                    },
                )
            }
            (&Method::POST, "/git-receive-pack") => Intercept::proxy(
                req,
                Pending {
                    kind: PendingKind::Push { target },
                },
            ),
            (&Method::GET, "/info/refs") if query_has(&query, "service", "git-upload-pack") => {
                if !self.config.acceleration.enabled {
                    return Intercept::proxy(req, Pending::none());
                }
                Intercept::proxy(
                    req,
                    Pending {
                        kind: PendingKind::InfoRefs { key, target },
                    },
                )
            }
            (&Method::POST, "/git-upload-pack") if self.config.acceleration.enabled => {
                self.intercept_upload_pack(req, key, target, git_protocol, primary_known)
                    .await
            }
            _ => Intercept::proxy(req, Pending::none()),
        }
    }

    async fn intercept_upload_pack(
        &self,
        req: Request<Body>,
        key: ClientKey,
        target: RepoTarget,
        git_protocol: Option<String>,
        primary_known: bool,
    ) -> Intercept {
        let (parts, body) = req.into_parts();
        let cap = self.config.acceleration.max_request_peek_bytes;
        let (buffered, complete) = match read_prefix(body, cap).await {
            Ok(v) => v,
            Err(_) => {
                return Intercept::Served(
                    "git_upload_pack",
                    crate::http_util::error(
                        StatusCode::BAD_REQUEST,
                        "could not read the request body",
                        false,
                    ),
                );
            }
        };
        let reassemble = |parts: http::request::Parts, buffered: Bytes, rest: Option<Body>| {
            let body = match rest {
                None => Body::from(buffered),
                Some(rest) => Body::from_stream(
                    futures::stream::once(async move { Ok::<_, axum::Error>(buffered) })
                        .chain(rest.into_data_stream()),
                ),
            };
            Request::from_parts(parts, body)
        };
        if let Err(rest) = complete {
            self.metrics.proxied("too_large");
            return Intercept::proxy(reassemble(parts, buffered, Some(rest)), Pending::none());
        }
        let gzip = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let plain = if gzip {
            match gunzip(&buffered, cap * 8) {
                Some(p) => Bytes::from(p),
                None => {
                    self.metrics.proxied("capability");
                    return Intercept::proxy(reassemble(parts, buffered, None), Pending::none());
                }
            }
        } else {
            buffered.clone()
        };
        let parsed = match request::parse(&plain) {
            Ok(p) => p,
            Err(_) => {
                return Intercept::proxy(reassemble(parts, buffered, None), Pending::none());
            }
        };
        if parsed.v2 && parsed.command == "ls-refs" {
            let digest: [u8; 32] = sha2::Sha256::digest(&plain).into();
            return Intercept::proxy(
                reassemble(parts, buffered, None),
                Pending {
                    kind: PendingKind::LsRefs {
                        key,
                        target,
                        digest,
                    },
                },
            );
        }
        if parsed.command != "fetch" {
            return Intercept::proxy(reassemble(parts, buffered, None), Pending::none());
        }
        let primary_down = !primary_known || self.primary_down.load(Ordering::Relaxed);
        let reason = self
            .local_verdict(key, &target, &parsed, primary_down)
            .await;
        match reason {
            None => {
                let entry_age = self
                    .cache
                    .get(key, &target.replicable, &target.item_id, true)
                    .map(|e| e.confirmed_at.elapsed());
                match self
                    .serve_local(
                        &target,
                        plain,
                        git_protocol.as_deref(),
                        primary_down.then_some(entry_age).flatten(),
                    )
                    .await
                {
                    Some(resp) => Intercept::Served("git_upload_pack", resp),
                    None => {
                        self.metrics.proxied("local_error");
                        Intercept::proxy(reassemble(parts, buffered, None), Pending::none())
                    }
                }
            }
            Some(reason) => {
                if reason == "wants_missing" {
                    self.secondary
                        .request_sync(&target.replicable, &target.item_id);
                }
                let pending = Pending {
                    kind: PendingKind::Fetch {
                        key,
                        target,
                        body: plain,
                        git_protocol,
                        reason,
                    },
                };
                Intercept::proxy(reassemble(parts, buffered, None), pending)
            }
        }
    }

    /// `None`: serve locally; `Some(reason)`: proxy.
    async fn local_verdict(
        &self,
        key: ClientKey,
        target: &RepoTarget,
        req: &request::FetchRequest,
        primary_down: bool,
    ) -> Option<&'static str> {
        let Some(entry) = self
            .cache
            .get(key, &target.replicable, &target.item_id, primary_down)
        else {
            return Some("no_authorization");
        };
        if req.wants.is_empty() || req.wants.iter().any(|w| !entry.tips.contains(w)) {
            return Some("want_not_advertised");
        }
        if !req.unsupported.is_empty() {
            return Some("capability");
        }
        let path = self
            .secondary
            .replica_path(&target.replicable, &target.item_id)?;
        if !has_objects(&path, &req.wants).await {
            return Some("wants_missing");
        }
        None
    }

    async fn serve_local(
        &self,
        target: &RepoTarget,
        body: Bytes,
        git_protocol: Option<&str>,
        stale: Option<Duration>,
    ) -> Option<Resp> {
        let path = self
            .secondary
            .replica_path(&target.replicable, &target.item_id)?;
        let (out, waited) = self.pool.serve(&path, body, git_protocol).await.ok()?;
        self.metrics.served_local("git_upload_pack", waited);
        let mut resp = http::Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-git-upload-pack-result")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(out)
            .ok()?;
        if let Some(age) = stale {
            resp.headers_mut().insert(
                geoforge_crds::wire::STALENESS_HEADER,
                HeaderValue::from(age.as_secs()),
            );
        }
        Some(resp)
    }

    /// After proxying: learn from the primary's answer, or fall back to the replica when the
    /// primary is unreachable and the client's authorization is younger than `maxStaleness`.
    pub async fn complete(&self, pending: Pending, resp: Resp) -> Resp {
        let unreachable = matches!(
            resp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        );
        match &pending.kind {
            PendingKind::None => {}
            _ => self.primary_down.store(unreachable, Ordering::Relaxed),
        }
        match pending.kind {
            PendingKind::None => resp,
            PendingKind::Push { target } => {
                if resp.status() != StatusCode::OK {
                    return resp;
                }
                // Read-your-writes: sync the repository once the push is acknowledged.
                let secondary = self.secondary.clone();
                on_end(resp, move || {
                    secondary.request_sync(&target.replicable, &target.item_id)
                })
            }
            PendingKind::LfsBatch => {
                if resp.status() != StatusCode::OK {
                    return resp;
                }
                self.rewrite_lfs_batch(resp).await
            }
            PendingKind::InfoRefs { key, target, .. } => {
                if unreachable {
                    let Some(entry) =
                        self.cache
                            .get(key, &target.replicable, &target.item_id, true)
                    else {
                        return resp;
                    };
                    let Some(adv) = entry.advertisement else {
                        return resp;
                    };
                    self.metrics.served_local("git_info_refs", Duration::ZERO);
                    let mut r = http::Response::builder()
                        .status(StatusCode::OK)
                        .header(
                            header::CONTENT_TYPE,
                            "application/x-git-upload-pack-advertisement",
                        )
                        .header(header::CACHE_CONTROL, "no-cache")
                        .header(
                            geoforge_crds::wire::STALENESS_HEADER,
                            entry.confirmed_at.elapsed().as_secs(),
                        )
                        .body(Body::from(adv))
                        .expect("static response");
                    r.headers_mut()
                        .insert("x-geo-served-by", HeaderValue::from_static("replica"));
                    return r;
                }
                if resp.status() != StatusCode::OK {
                    return resp;
                }
                let cache = self.cache_handle();
                capture(resp, move |body| match advert::v0_tips(&body) {
                    Some(tips) => {
                        cache.record(key, &target.replicable, &target.item_id, tips, Some(body))
                    }
                    None => cache.record_v2_caps(key, &target.replicable, &target.item_id, body),
                })
            }
            PendingKind::LsRefs {
                key,
                target,
                digest,
            } => {
                if unreachable {
                    let Some(entry) =
                        self.cache
                            .get(key, &target.replicable, &target.item_id, true)
                    else {
                        return resp;
                    };
                    let Some((d, body)) = entry.ls_refs.filter(|(d, _)| *d == digest) else {
                        return resp;
                    };
                    let _ = d;
                    self.metrics.served_local("git_ls_refs", Duration::ZERO);
                    return http::Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "application/x-git-upload-pack-result")
                        .header(header::CACHE_CONTROL, "no-cache")
                        .header(
                            geoforge_crds::wire::STALENESS_HEADER,
                            entry.confirmed_at.elapsed().as_secs(),
                        )
                        .body(Body::from(body))
                        .expect("static response");
                }
                if resp.status() != StatusCode::OK {
                    return resp;
                }
                let cache = self.cache_handle();
                capture(resp, move |body| {
                    if let Some(tips) = advert::v2_ls_refs_tips(&body) {
                        cache.record_ls_refs(
                            key,
                            &target.replicable,
                            &target.item_id,
                            tips,
                            digest,
                            body,
                        );
                    }
                })
            }
            PendingKind::Fetch {
                key,
                target,
                body,
                git_protocol,
                reason,
            } => {
                if unreachable
                    && self
                        .cache
                        .get(key, &target.replicable, &target.item_id, true)
                        .is_some()
                {
                    let parsed = request::parse(&body).ok();
                    if let Some(p) = parsed
                        && self.local_verdict(key, &target, &p, true).await.is_none()
                    {
                        let age = self
                            .cache
                            .get(key, &target.replicable, &target.item_id, true)
                            .map(|e| e.confirmed_at.elapsed());
                        if let Some(r) = self
                            .serve_local(
                                &target,
                                body,
                                git_protocol.as_deref(),
                                age.or(Some(Duration::ZERO)),
                            )
                            .await
                        {
                            return r;
                        }
                    }
                }
                self.metrics.proxied(reason);
                resp
            }
        }
    }

    async fn lfs_download(&self, path: &str, query: &str, headers: &http::HeaderMap) -> Resp {
        let (replicable, oid) =
            match super::lfs::verify_link(&self.config, &self.secondary_keyring(), path, query) {
                Ok(v) => v,
                Err(msg) => return crate::http_util::error(StatusCode::UNAUTHORIZED, msg, true),
            };
        let Some(item) = super::lfs::item_for(&self.config, &replicable, &oid) else {
            return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true);
        };
        if !self.secondary.is_synced(&replicable, &item).await {
            return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true);
        }
        let Some(file) = self.secondary.replica_path(&replicable, &item) else {
            return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true);
        };
        self.metrics.served_local("lfs_download", Duration::ZERO);
        super::lfs::serve_file(file, headers).await
    }

    async fn rewrite_lfs_batch(&self, resp: Resp) -> Resp {
        const MAX_BATCH: usize = 4 * 1024 * 1024;
        let (mut parts, body) = resp.into_parts();
        let Ok((bytes, rest)) = read_prefix(body, MAX_BATCH).await else {
            return crate::http_util::error(
                StatusCode::BAD_GATEWAY,
                "the primary's LFS answer was cut off",
                true,
            );
        };
        if let Err(rest) = rest {
            let body = Body::from_stream(
                futures::stream::once(async move { Ok::<_, axum::Error>(bytes) })
                    .chain(rest.into_data_stream()),
            );
            return http::Response::from_parts(parts, body);
        }
        let Ok(mut batch) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return http::Response::from_parts(parts, Body::from(bytes));
        };
        let mut changed = false;
        for (i, oid) in super::lfs::download_oids(&batch) {
            for (replicable, _) in super::lfs::lfs_replicables(&self.config) {
                let Some(item) = super::lfs::item_for(&self.config, &replicable, &oid) else {
                    continue;
                };
                if self.secondary.is_synced(&replicable, &item).await {
                    let href = super::lfs::link(&self.config, &self.signing_key, &replicable, &oid);
                    super::lfs::point_download_at(&mut batch, i, href);
                    changed = true;
                    break;
                }
            }
        }
        if !changed {
            return http::Response::from_parts(parts, Body::from(bytes));
        }
        let out = serde_json::to_vec(&batch).expect("JSON value serializes");
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
        http::Response::from_parts(parts, Body::from(out))
    }

    fn secondary_keyring(&self) -> Arc<geoforge_crds::auth::KeyRing> {
        self.keyring.clone()
    }

    fn cache_handle(&self) -> Arc<AuthCache> {
        self.cache.clone()
    }

    fn push_redirect(&self, path: &str, query: &str) -> Option<Resp> {
        let prefix = format!("/-/push_from_secondary/{}", self.config.site_id);
        let location = match self.config.push_redirect {
            PushRedirect::Proxy => return None,
            PushRedirect::Unified => format!(
                "{}{prefix}{path}?{query}",
                self.config.external_url.trim_end_matches('/')
            ),
            PushRedirect::Separate => {
                let primary = self.config.primary_external_url.as_deref()?;
                format!("{}{prefix}{path}?{query}", primary.trim_end_matches('/'))
            }
        };
        http::Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location)
            .body(Body::empty())
            .ok()
    }

    /// Queue depth and other gauges are read at scrape time.
    pub fn pool(&self) -> &UploadPackPool {
        &self.pool
    }
}

/// `/-/push_from_secondary/<site>/rest` or `/-/from_secondary/<site>/rest` → `/rest`.
pub fn strip_push_prefix(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/-/push_from_secondary/")
        .or_else(|| path.strip_prefix("/-/from_secondary/"))?;
    let (_site, rest) = rest.split_once('/')?;
    Some(format!("/{rest}"))
}

fn with_path(req: Request<Body>, path: &str) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    if let Ok(uri) = pq.parse() {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
}

fn query_has(query: &str, key: &str, value: &str) -> bool {
    query.split('&').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k == key && v == value)
    })
}

/// Reads up to `cap` bytes. `Ok(rest)` is `Ok(())` when the body ended within the cap, else
/// `Err(rest_of_body)` carrying what was not read.
async fn read_prefix(body: Body, cap: usize) -> Result<(Bytes, Result<(), Body>), axum::Error> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        buf.extend_from_slice(&chunk);
        if buf.len() > cap {
            return Ok((buf.freeze(), Err(Body::from_stream(stream))));
        }
    }
    Ok((buf.freeze(), Ok(())))
}

fn gunzip(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = vec![];
    flate2::read::GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() <= limit).then_some(out)
}

/// Streams `resp` to the client while keeping a copy (up to [`MAX_ADVERTISEMENT`]); `done`
/// gets the copy when the body ended cleanly.
fn capture<F>(resp: Resp, done: F) -> Resp
where
    F: FnOnce(Bytes) + Send + 'static,
{
    let (parts, body) = resp.into_parts();
    let mut copy = Some(BytesMut::new());
    let mut done = Some(done);
    let mut stream = body.into_data_stream();
    let s = async_stream_like(move |cx| {
        let item = futures::ready!(stream.poll_next_unpin(cx));
        match &item {
            Some(Ok(chunk)) => {
                if let Some(c) = copy.as_mut() {
                    if c.len() + chunk.len() > MAX_ADVERTISEMENT {
                        copy = None;
                    } else {
                        c.extend_from_slice(chunk);
                    }
                }
            }
            Some(Err(_)) => copy = None,
            None => {
                if let (Some(c), Some(f)) = (copy.take(), done.take()) {
                    f(c.freeze());
                }
            }
        }
        std::task::Poll::Ready(item)
    });
    http::Response::from_parts(parts, Body::from_stream(s))
}

/// Calls `f` once the response body has been streamed to its end.
fn on_end<F>(resp: Resp, f: F) -> Resp
where
    F: FnOnce() + Send + 'static,
{
    capture_end(resp, f)
}

fn capture_end<F>(resp: Resp, f: F) -> Resp
where
    F: FnOnce() + Send + 'static,
{
    let (parts, body) = resp.into_parts();
    let mut f = Some(f);
    let mut stream = body.into_data_stream();
    let s = async_stream_like(move |cx| {
        let item = futures::ready!(stream.poll_next_unpin(cx));
        if item.is_none()
            && let Some(f) = f.take()
        {
            f();
        }
        std::task::Poll::Ready(item)
    });
    http::Response::from_parts(parts, Body::from_stream(s))
}

fn async_stream_like<T, F>(f: F) -> futures::stream::PollFn<F>
where
    F: FnMut(&mut std::task::Context<'_>) -> std::task::Poll<Option<T>>,
{
    futures::stream::poll_fn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_prefixes() {
        assert_eq!(
            strip_push_prefix("/-/push_from_secondary/tokyo/g/p.git/info/refs").as_deref(),
            Some("/g/p.git/info/refs")
        );
        assert_eq!(
            strip_push_prefix("/-/from_secondary/tokyo/g/p.git/git-receive-pack").as_deref(),
            Some("/g/p.git/git-receive-pack")
        );
        assert_eq!(strip_push_prefix("/g/p.git/info/refs"), None);
        assert!(query_has(
            "service=git-upload-pack",
            "service",
            "git-upload-pack"
        ));
        assert!(!query_has(
            "service=git-upload-packx",
            "service",
            "git-upload-pack"
        ));
    }
}
