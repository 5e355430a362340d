//! The service port's request handler, in phases (Pingora style):
//!
//! 1. **request filter** — framing checks (conflicting `Content-Length`/`Transfer-Encoding`
//!    → 400), request id, ingress header hygiene (DESIGN §2): client-sent
//!    `Gitlab-Workhorse-Geo-Proxy*` headers are removed; `X-Forwarded-*`/`Forwarded` too
//!    unless the peer is a trusted proxy or (on a primary) the request carries a valid
//!    `proxy`-scope extra-data token from a known secondary;
//! 2. **pick target** — [`crate::proxy::route::pick_target`];
//! 3. **serve** — Geo API in-process, the forge (embedded or upstream), or the primary;
//! 4. **response filter** — `Location`/`Refresh`/`Set-Cookie` rewrites on proxied responses,
//!    `x-request-id`, metrics.
//!
//! **Audience of the extra data.** The token a secondary mints for the primary needs the
//! primary's site id as `aud`. The discovery API gives only a URL, so the secondary takes
//! the site owning its trusted peer keys (`keys.trusted`, minus its own site): a secondary's
//! config lists exactly one peer primary in practice. With several peers, the one whose id
//! is the first DNS label of the primary URL's host wins, else the first listed (a warning
//! is logged once). Tokens are cached for at most [`EXTRA_DATA_CACHE`] and never logged.

use crate::accel::Intercept;
use crate::context::{PrimaryWatch, PushSink, SiteContext};
use crate::forge::EmbeddedForge;
use crate::forge::report_status::PushDetectBody;
use crate::proxy::h1::{Hop, Passthrough, RawSlot};
use crate::proxy::headers::{self, TrustedProxies};
use crate::proxy::metrics::{ProxyMetrics, RequestLabels, UpstreamErrorLabels};
use crate::proxy::route::{self, Target};
use crate::proxy::upstream::{Upstream, UpstreamBase, UpstreamError};
use axum::body::Body;
use futures::FutureExt;
use geoforge_crds::auth::{PROXY_EXTRA_DATA_HEADER, PROXY_HEADER, Scope};
use geoforge_crds::geosite::SiteRole;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tower::ServiceExt;
use tracing::Instrument;

/// How long a minted extra-data token is reused (tokens live 30 s).
pub const EXTRA_DATA_CACHE: Duration = Duration::from_secs(5);
/// `Retry-After` of 503s when the primary is unreachable or unknown.
const RETRY_AFTER_SECS: u64 = 10;
const PROXY_HEADER_NAME: HeaderName = HeaderName::from_static(PROXY_HEADER);
const PROXY_EXTRA_DATA_HEADER_NAME: HeaderName = HeaderName::from_static(PROXY_EXTRA_DATA_HEADER);

/// Who writes a response to the client.
#[derive(Clone, Copy, Debug)]
pub enum Writer<'a> {
    /// Writes what the response's map holds (hyper).
    MapOnly,
    /// Also copies the header lines a proxied response passed through raw, which it finds in
    /// this slot ([`RawLines`](crate::proxy::h1::RawLines); the HTTP/1.1 fast path). Nothing
    /// here replaces a proxied response after the upstream gave it, so the lines in the slot
    /// belong to the response returned (the accelerator's path, which may, gets no slot).
    CopiesRawLines(&'a RawSlot),
}

/// The response headers this module's response filter reads or replaces
/// ([`headers::rewrite_response`] and the request id): an upstream's lines with these names
/// are always parsed into the map, never passed through raw.
const FILTERED: Passthrough =
    Passthrough::new(&["location", "refresh", "set-cookie", "x-request-id"]);

/// The forge behind a primary or disabled site.
pub enum ForgeBackend {
    Embedded(Arc<EmbeddedForge>),
    Upstream(Box<UpstreamBase>),
}

/// What the service port needs for every request.
pub struct Front {
    ctx: SiteContext,
    trusted: TrustedProxies,
    geo_api: Option<axum::Router>,
    forge: Option<ForgeBackend>,
    primary: Option<PrimaryWatch>,
    /// Secondary read acceleration (Git fetches, LFS downloads, push forwarding).
    read_accel: Option<Arc<crate::accel::Accelerator>>,
    push_sink: Option<Arc<dyn PushSink>>,
    upstream: Upstream,
    metrics: ProxyMetrics,
    /// Tells fronts apart in the per-thread caches ([`ThreadPrimary`]).
    id: u64,
    peer_sites: Vec<String>,
    warned_aud: std::sync::atomic::AtomicBool,
}

/// The primary at one URL, as the proxy needs it.
struct PrimaryRoute {
    base: UpstreamBase,
    /// URL prefixes that `Location`/`Refresh` rewrites replace (internal, then external URL).
    rewrite_from: Vec<String>,
    /// The primary's site id: the audience of the extra data (see the module docs).
    aud: Option<String>,
}

/// What ingress learnt about a request.
struct Ingress {
    peer: IpAddr,
    /// The client address: the peer, or what a trusted proxy / verified secondary says.
    client: IpAddr,
    /// The secondary that proxied this request (verified extra data).
    via_site: Option<String>,
    /// Sent upstream as `X-Request-Id` (the client's own when it sent a valid one).
    request_id: HeaderValue,
}

/// What serving a request gives: the target label for the metrics, and the response.
type Served = (&'static str, Response<Body>);

pin_project_lite::pin_project! {
    /// How a request is served once its head has been looked at ([`Front::serve`]): an
    /// answer at hand, a forward to the forge or to the primary (the hot paths, futures of
    /// their own types), or a boxed future for the rarer and heavier branches.
    #[project = ServingProj]
    enum Serving<'a, F, P> {
        Ready { served: Option<Served> },
        Forge { #[pin] fut: F },
        Primary { #[pin] fut: P },
        Boxed { fut: Pin<Box<dyn Future<Output = Served> + Send + 'a>> },
    }
}

impl<'a, F, P> Serving<'a, F, P> {
    fn ready(label: &'static str, resp: Response<Body>) -> Self {
        Serving::Ready {
            served: Some((label, resp)),
        }
    }

    fn boxed(fut: impl Future<Output = Served> + Send + 'a) -> Self {
        Serving::Boxed { fut: Box::pin(fut) }
    }
}

impl<F: Future<Output = Served>, P: Future<Output = Served>> Future for Serving<'_, F, P> {
    type Output = Served;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Served> {
        match self.project() {
            ServingProj::Ready { served } => {
                Poll::Ready(served.take().expect("a served request is not polled again"))
            }
            ServingProj::Forge { fut } => fut.poll(cx),
            ServingProj::Primary { fut } => fut.poll(cx),
            ServingProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// The primary's upstream, owned by the forward that uses it.
struct RouteBase(Arc<PrimaryRoute>);

impl std::ops::Deref for RouteBase {
    type Target = UpstreamBase;

    fn deref(&self) -> &UpstreamBase {
        &self.0.base
    }
}

/// A secondary's I/O thread's own copy of what proxying to the primary needs. Its watch
/// receiver tells a changed URL by reading a version, without the watch's lock; the route and
/// the minted extra data are this thread's, so their reference counts are written by no
/// other thread. Each thread picks up a new URL with its next request.
struct ThreadPrimary {
    front: u64,
    watch: PrimaryWatch,
    /// For the URL last seen: `None` when none is known.
    route: Option<Result<Arc<PrimaryRoute>, UpstreamError>>,
    /// The extra data last minted on this thread: audience, header, when.
    token: Option<(String, HeaderValue, Instant)>,
    seen: bool,
}

thread_local! {
    static THREAD_PRIMARY: std::cell::RefCell<Option<ThreadPrimary>> =
        const { std::cell::RefCell::new(None) };
}

static NEXT_FRONT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Front {
    /// `geo_api`: the primary's Geo API router; `forge`: the forge of a primary/disabled site;
    /// `primary`: a secondary's watch of the primary URL; `push_sink`: where completed pushes go.
    pub fn new(
        ctx: SiteContext,
        geo_api: Option<axum::Router>,
        forge: Option<ForgeBackend>,
        primary: Option<PrimaryWatch>,
        push_sink: Option<Arc<dyn PushSink>>,
    ) -> anyhow::Result<Front> {
        let trusted =
            TrustedProxies::parse(&ctx.config.trusted_proxies).map_err(anyhow::Error::msg)?;
        let mut peer_sites: Vec<String> = vec![];
        for k in &ctx.config.keys.trusted {
            let s = k.site().to_string();
            if s != ctx.site_id() && !peer_sites.contains(&s) {
                peer_sites.push(s);
            }
        }
        if ctx.config.role == SiteRole::Secondary && peer_sites.is_empty() {
            tracing::warn!(
                "keys.trusted lists no peer site: proxied requests carry no Geo extra data, so \
                 the primary will not trust forwarded client addresses"
            );
        }
        Ok(Front {
            upstream: Upstream::new(&ctx.config.proxy),
            metrics: ProxyMetrics::register(&ctx.metrics),
            trusted,
            geo_api,
            forge,
            primary,
            read_accel: None,
            push_sink,
            id: NEXT_FRONT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            peer_sites,
            warned_aud: false.into(),
            ctx,
        })
    }

    /// Plugs in the secondary's read accelerator ([`crate::accel`]).
    pub fn with_read_accelerator(mut self, a: Arc<crate::accel::Accelerator>) -> Front {
        self.read_accel = Some(a);
        self
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// Handles one request.
    ///
    /// The request filter and the choice of target run when this is called; the future holds
    /// what serving needs, not the request (see [`Upstream::forward`] on why that matters).
    ///
    /// `writer` says who writes the response: with [`Writer::CopiesRawLines`], a proxied
    /// response's header lines may be left in the writer's slot as the upstream sent them
    /// ([`RawLines`](crate::proxy::h1::RawLines)) instead of in its map.
    pub fn handle<'a>(
        &'a self,
        peer: SocketAddr,
        req: Request<Body>,
        writer: Writer<'a>,
    ) -> impl Future<Output = Response<Body>> + Send + 'a {
        let passthrough = match writer {
            Writer::MapOnly => None,
            Writer::CopiesRawLines(slot) => Some((FILTERED, slot)),
        };
        let start = Instant::now();
        let method = method_label(req.method());
        let route_name = route::route_label(req.uri().path(), req.uri().query());
        let request_id = request_id(req.headers());
        let span = tracing::info_span!("request", id = request_id.to_str().unwrap_or(""), method = %req.method(),
            path = %req.uri().path(), client = tracing::field::Empty, via = tracing::field::Empty);
        let serving = span.in_scope(|| self.serve(peer, req, &request_id, route_name, passthrough));
        // Combinators rather than `async` blocks: a block that awaits a future it captured
        // keeps room for it twice.
        serving
            .map(move |(target, resp)| {
                // The access log (one line per request; token headers are never logged).
                tracing::info!(
                    status = resp.status().as_u16(),
                    target = target,
                    route = route_name,
                    ms = start.elapsed().as_millis() as u64,
                    "request"
                );
                (target, resp)
            })
            .instrument(span)
            .map(move |(target, mut resp)| {
                resp.headers_mut().insert(X_REQUEST_ID, request_id);
                self.metrics.count_request(RequestLabels {
                    route: route_name,
                    method,
                    code: resp.status().as_u16(),
                    target,
                });
                self.metrics
                    .observe_latency(target, start.elapsed().as_secs_f64());
                resp
            })
    }

    /// The request filter and the choice of target (phases 1 and 2 of the module docs); the
    /// [`Serving`] it returns serves and filters the response (3 and 4).
    fn serve<'a>(
        &'a self,
        peer: SocketAddr,
        mut req: Request<Body>,
        request_id: &HeaderValue,
        route_name: &'static str,
        passthrough: Option<(Passthrough, &'a RawSlot)>,
    ) -> Serving<
        'a,
        impl Future<Output = Served> + Send + use<'a>,
        impl Future<Output = Served> + Send + use<'a>,
    > {
        // 1. request filter
        if let Some(resp) = framing_check(&req, self.ctx.config.proxy.max_header_bytes) {
            return Serving::ready("local", resp);
        }
        let ingress = self.ingress(&mut req, peer.ip(), request_id);
        if tracing::level_enabled!(tracing::Level::INFO) {
            let span = tracing::Span::current();
            span.record("client", tracing::field::display(ingress.client));
            if let Some(site) = &ingress.via_site {
                span.record("via", tracing::field::display(site));
            }
        }
        // 2. pick target
        // this thread's copy of the route: the watch's lock is taken only when the URL changed
        let primary = self.primary.as_ref().and_then(|w| self.primary_route(w));
        let target = {
            let (parts, body) = req.into_parts();
            let t = route::pick_target(self.ctx.config.role, &parts, primary);
            req = Request::from_parts(parts, body);
            t
        };
        let label = target.label();
        // 3. serve, 4. response filter
        match target {
            Target::GeoApi => {
                Serving::boxed(async move { (label, self.serve_geo_api(req, peer).await) })
            }
            Target::Forge => {
                let req = strip_from_secondary_prefix(req);
                match &self.forge {
                    Some(ForgeBackend::Upstream(forge)) => Serving::Forge {
                        fut: self.forward_to_forge(req, &ingress, route_name, forge, passthrough),
                    },
                    Some(ForgeBackend::Embedded(f)) => {
                        let client = ingress.client;
                        Serving::boxed(async move { (label, f.serve(req, client).await) })
                    }
                    None => Serving::ready(
                        label,
                        crate::http_util::error(
                            StatusCode::NOT_FOUND,
                            "no forge configured",
                            false,
                        ),
                    ),
                }
            }
            // A secondary's reads: the accelerator answers from the replica what it can
            // (DESIGN §3) and learns from what the primary answers.
            Target::Primary(route) if self.read_accel.is_some() => {
                let accel = self.read_accel.as_ref().expect("checked");
                Serving::boxed(async move {
                    match accel.intercept(req, ingress.client, true).await {
                        Intercept::Served(_, resp) => ("local", resp),
                        Intercept::Proxy(req, pending) => {
                            let resp = match route {
                                Ok(route) => {
                                    self.forward_to_primary(*req, &ingress, route, None).await.1
                                }
                                Err(e) => self.primary_unreachable(req.headers(), &e),
                            };
                            (label, accel.complete(pending, resp).await)
                        }
                    }
                })
            }
            Target::Unavailable if self.read_accel.is_some() => {
                let accel = self.read_accel.as_ref().expect("checked");
                Serving::boxed(async move {
                    match accel.intercept(req, ingress.client, false).await {
                        Intercept::Served(_, resp) => ("local", resp),
                        Intercept::Proxy(req, pending) => {
                            let resp =
                                primary_unavailable(req.headers(), "the primary site is unknown");
                            (label, accel.complete(pending, resp).await)
                        }
                    }
                })
            }
            Target::Primary(Ok(route)) => Serving::Primary {
                fut: self.forward_to_primary(req, &ingress, route, passthrough),
            },
            Target::Primary(Err(e)) => {
                Serving::ready(label, self.primary_unreachable(req.headers(), &e))
            }
            Target::Unavailable => Serving::ready(
                label,
                primary_unavailable(req.headers(), "the primary site is unknown"),
            ),
        }
    }

    /// Ingress header hygiene (DESIGN §2); see the module docs.
    fn ingress(&self, req: &mut Request<Body>, peer: IpAddr, request_id: &HeaderValue) -> Ingress {
        let peer = headers::canonical(peer);
        let h = req.headers_mut();
        let mut via_site = None;
        if self.ctx.config.role == SiteRole::Primary
            && let Some(v) = headers::extra_data(h)
        {
            match self
                .ctx
                .keyring
                .verify_token(v, self.ctx.site_id(), Scope::Proxy)
            {
                Ok(ver) if ver.site != self.ctx.site_id() => {
                    via_site = Some(ver.site);
                }
                Ok(_) => tracing::debug!("extra data signed by this site itself: ignored"),
                Err(e) => tracing::info!(peer = %peer, "ignoring Geo proxy headers: {e}"),
            }
        }
        headers::strip_geo_headers(h);
        let peer_trusted = self.trusted.contains(peer);
        if via_site.is_none() && !peer_trusted {
            headers::strip_forwarding(h);
        }
        let client = if via_site.is_some() {
            headers::last_forwarded_for(h).unwrap_or(peer)
        } else if peer_trusted {
            headers::client_behind_trusted(h, &self.trusted).unwrap_or(peer)
        } else {
            peer
        };
        Ingress {
            peer,
            client,
            via_site,
            request_id: request_id.clone(),
        }
    }

    async fn serve_geo_api(&self, mut req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        let Some(router) = &self.geo_api else {
            return crate::http_util::error(StatusCode::NOT_FOUND, "no Geo API here", false);
        };
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        match router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(e) => match e {},
        }
    }

    /// Proxies to the forge's upstream; a completed push is handed to the push sink.
    fn forward_to_forge<'a>(
        &'a self,
        req: Request<Body>,
        ingress: &Ingress,
        route_name: &'static str,
        forge: &'a UpstreamBase,
        passthrough: Option<(Passthrough, &'a RawSlot)>,
    ) -> impl Future<Output = Served> + Send + use<'a> {
        let json = crate::http_util::wants_json(req.headers());
        let forwarding = self.forwarding(&req, ingress);
        let hop = Hop {
            forwarding: Some(&forwarding),
            request_id: Some(&ingress.request_id),
            extra: &[],
        };
        // only a push's path is kept (for its event)
        let push_path = (route_name == "git_receive_pack" && req.method() == http::Method::POST)
            .then(|| req.uri().path().to_string());
        self.upstream
            .forward(req, forge, hop, passthrough)
            .map(move |forwarded| {
                let resp = match forwarded {
                    Ok(resp) => match (&self.push_sink, push_path) {
                        (Some(sink), Some(path)) if resp.status() == StatusCode::OK => {
                            let (parts, body) = resp.into_parts();
                            Response::from_parts(
                                parts,
                                Body::new(PushDetectBody::new(body, sink.clone(), path)),
                            )
                        }
                        _ => resp,
                    },
                    Err(e) => {
                        self.upstream_error("forge", &e);
                        crate::http_util::error(
                            StatusCode::BAD_GATEWAY,
                            "the forge is unreachable",
                            json,
                        )
                    }
                };
                ("forge", resp)
            })
    }

    /// Proxies to the primary with the Geo headers; `Location`/`Refresh`/`Set-Cookie` of the
    /// response are rewritten for this site.
    fn forward_to_primary<'a>(
        &'a self,
        req: Request<Body>,
        ingress: &Ingress,
        route: Arc<PrimaryRoute>,
        passthrough: Option<(Passthrough, &'a RawSlot)>,
    ) -> impl Future<Output = Served> + Send + use<'a> {
        let json = crate::http_util::wants_json(req.headers());
        let forwarding = self.forwarding(&req, ingress);
        let (with_token, marker_only);
        let extra: &[(HeaderName, HeaderValue)] = match self.extra_data_for(&route) {
            Some(token) => {
                with_token = [
                    (PROXY_HEADER_NAME, HeaderValue::from_static("1")),
                    (PROXY_EXTRA_DATA_HEADER_NAME, token),
                ];
                &with_token
            }
            // no audience known: the marker alone
            None => {
                marker_only = [(PROXY_HEADER_NAME, HeaderValue::from_static("1"))];
                &marker_only
            }
        };
        let hop = Hop {
            forwarding: Some(&forwarding),
            request_id: Some(&ingress.request_id),
            extra,
        };
        let forwarded = self
            .upstream
            .forward(req, RouteBase(route.clone()), hop, passthrough);
        forwarded.map(move |forwarded| {
            let resp = match forwarded {
                Ok(mut resp) => {
                    headers::rewrite_response(
                        resp.headers_mut(),
                        &route.rewrite_from,
                        &self.ctx.config.external_url,
                    );
                    resp
                }
                Err(e) => {
                    self.upstream_error("primary", &e);
                    primary_unavailable_json(json, "the primary site is unreachable")
                }
            };
            ("primary", resp)
        })
    }

    /// 503 for a primary whose URL does not work.
    fn primary_unreachable(&self, h: &http::HeaderMap, e: &UpstreamError) -> Response<Body> {
        self.upstream_error("primary", e);
        primary_unavailable(h, "the primary site is unreachable")
    }

    /// The route to the primary at the watched URL (`None`: no URL known). Each I/O thread
    /// works it out once per URL change and keeps its own copy ([`ThreadPrimary`]): a request
    /// takes no lock and counts no reference that another thread also writes.
    fn primary_route(
        &self,
        watch: &PrimaryWatch,
    ) -> Option<Result<Arc<PrimaryRoute>, UpstreamError>> {
        THREAD_PRIMARY.with_borrow_mut(|slot| {
            if !matches!(slot, Some(t) if t.front == self.id) {
                *slot = Some(ThreadPrimary {
                    front: self.id,
                    watch: watch.clone(),
                    route: None,
                    token: None,
                    seen: false,
                });
            }
            let t = slot.as_mut().expect("set above");
            // a closed watch keeps its last value: so does the route
            if !t.seen || t.watch.has_changed().unwrap_or(false) {
                let url = t.watch.borrow_and_update().clone();
                t.route = url.map(|u| self.build_route(&u));
                t.token = None;
                t.seen = true;
            }
            t.route.clone()
        })
    }

    /// What proxying to the primary at `primary` needs.
    fn build_route(&self, primary: &str) -> Result<Arc<PrimaryRoute>, UpstreamError> {
        let url = url::Url::parse(primary).map_err(|e| UpstreamError::BadUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UpstreamError::BadUrl(format!("scheme {}", url.scheme())));
        }
        let mut rewrite_from = vec![primary.to_string()];
        if let Some(ext) = &self.ctx.config.primary_external_url {
            rewrite_from.push(ext.clone());
        }
        Ok(Arc::new(PrimaryRoute {
            base: UpstreamBase::new(&url)?,
            rewrite_from,
            aud: self.primary_site(&url),
        }))
    }

    /// This hop's forwarding headers for `req`.
    fn forwarding(&self, req: &Request<Body>, ingress: &Ingress) -> headers::Forwarding {
        let authority; // an HTTP/2 request names its host in the URI
        let host = match headers::find(req.headers(), &header::HOST) {
            Some(h) => Some(h),
            None => {
                authority = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                authority.as_ref()
            }
        };
        headers::Forwarding::new(&headers::ForwardInfo {
            peer: ingress.peer,
            host,
            proto: "http",
        })
    }

    fn upstream_error(&self, target: &'static str, e: &UpstreamError) {
        tracing::warn!(target_site = target, "upstream request failed: {e}");
        self.metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                target,
                kind: e.kind(),
            })
            .inc();
    }

    /// The extra-data header for the primary of `route`, minted per thread and reused for
    /// [`EXTRA_DATA_CACHE`] (on the thread's coarse clock).
    fn extra_data_for(&self, route: &PrimaryRoute) -> Option<HeaderValue> {
        let aud = route.aud.as_deref()?;
        let now = crate::proxy::coarse_timer::now();
        THREAD_PRIMARY.with_borrow_mut(|slot| {
            let cache = slot.as_mut().filter(|t| t.front == self.id);
            if let Some(ThreadPrimary {
                token: Some((a, v, at)),
                ..
            }) = &cache
                && a == aud
                && now.saturating_duration_since(*at) < EXTRA_DATA_CACHE
            {
                return Some(v.clone());
            }
            let mut v = HeaderValue::from_str(&self.ctx.signing_key.extra_data(aud)).ok()?;
            v.set_sensitive(true);
            if let Some(t) = cache {
                t.token = Some((aud.to_string(), v.clone(), now));
            }
            Some(v)
        })
    }

    fn primary_site(&self, base: &url::Url) -> Option<String> {
        match self.peer_sites.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => {
                let label = base
                    .host_str()
                    .and_then(|h| h.split('.').next())
                    .unwrap_or("");
                if let Some(s) = many.iter().find(|s| s.as_str() == label) {
                    return Some(s.clone());
                }
                if !self
                    .warned_aud
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(sites = ?many, "several peer sites in keys.trusted; \
                        minting proxy extra data for the first");
                }
                Some(many[0].clone())
            }
        }
    }
}

/// A push redirected by a secondary (`pushRedirect: separate`) arrives at the primary under
/// `/-/push_from_secondary/<site>/…` (or `/-/from_secondary/<site>/…`): the forge sees the
/// path without the prefix.
fn strip_from_secondary_prefix(req: Request<Body>) -> Request<Body> {
    let Some(stripped) = crate::accel::engine::strip_push_prefix(req.uri().path()) else {
        return req;
    };
    let (mut parts, body) = req.into_parts();
    let pq = match parts.uri.query() {
        Some(q) => format!("{stripped}?{q}"),
        None => stripped,
    };
    if let Ok(uri) = pq.parse() {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
}

/// Requests whose framing is ambiguous never reach an upstream (request smuggling).
fn framing_check(req: &Request<Body>, max_header_bytes: usize) -> Option<Response<Body>> {
    let h = req.headers();
    // hyper bounds its read buffer; the exact head size is checked here (→ 431).
    let head: usize = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + h.iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > max_header_bytes {
        let mut r = crate::http_util::error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large",
            false,
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Some(r);
    }
    // hyper drops `Content-Length` when `Transfer-Encoding` is present; the connection's
    // sniffer saw both (see `proxy::sniff`).
    let conflict = req
        .extensions()
        .get::<crate::proxy::sniff::ConflictFlag>()
        .is_some_and(|f| f.is_set());
    if conflict
        || (headers::find(h, &header::TRANSFER_ENCODING).is_some()
            && headers::find(h, &header::CONTENT_LENGTH).is_some())
    {
        let mut r = crate::http_util::error(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding",
            false,
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Some(r);
    }
    None
}

use headers::X_REQUEST_ID;

/// `x-request-id` from the client when sane, else a fresh one.
fn request_id(h: &http::HeaderMap) -> HeaderValue {
    headers::find(h, &X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A fresh request id: a random per-thread prefix and the thread's counter in hex (no
/// syscall, no formatter, and no counter shared between the I/O threads, whose cache line
/// would move between cores on every request; unique across threads and the instances of a
/// site with overwhelming probability).
fn new_request_id() -> HeaderValue {
    thread_local! {
        /// The thread's prefix (written out once) and counter.
        static NEXT: std::cell::Cell<([u8; 17], u64)> = std::cell::Cell::new({
            let mut p = [b'-'; 17];
            push_hex(&mut p, 0, rand::random::<u64>(), 16);
            (p, 0)
        });
    }
    let (prefix, n) = NEXT.with(|c| {
        let (p, n) = c.get();
        c.set((p, n.wrapping_add(1)));
        (p, n)
    });
    let mut buf = [0u8; 33];
    buf[..17].copy_from_slice(&prefix);
    let digits = (16 - n.leading_zeros() as usize / 4).max(1);
    let len = push_hex(&mut buf, 17, n, digits);
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("-"))
}

/// Writes the low `digits` hex digits of `v` at `at`; returns the end.
fn push_hex(buf: &mut [u8], at: usize, v: u64, digits: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in 0..digits {
        buf[at + i] = HEX[((v >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    at + digits
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// 503 + `Retry-After` in the client's language.
pub fn primary_unavailable(h: &http::HeaderMap, msg: &str) -> Response<Body> {
    primary_unavailable_json(crate::http_util::wants_json(h), msg)
}

fn primary_unavailable_json(json: bool, msg: &str) -> Response<Body> {
    let mut r = crate::http_util::error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{msg}; try again later"),
        json,
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_the_response_filter_touches_are_never_passed_through_raw() {
        let touched = [
            header::LOCATION,
            HeaderName::from_static("refresh"),
            header::SET_COOKIE,
            headers::X_REQUEST_ID,
        ];
        for n in touched {
            assert!(FILTERED.names().contains(&n.as_str()), "{n}");
        }
    }

    #[test]
    fn hex_ids_match_the_formatter() {
        for (v, digits) in [
            (0u64, 1),
            (0xa, 1),
            (0x1f, 2),
            (u64::MAX, 16),
            (0x0123_4567, 16),
        ] {
            let mut buf = [0u8; 16];
            let n = push_hex(&mut buf, 0, v, digits);
            assert_eq!(
                std::str::from_utf8(&buf[..n]).unwrap(),
                format!("{v:0digits$x}")
            );
        }
        let a = new_request_id();
        let b = new_request_id();
        let (pa, ca) = a.to_str().unwrap().split_once('-').unwrap();
        let (pb, cb) = b.to_str().unwrap().split_once('-').unwrap();
        assert_eq!((pa.len(), pa), (16, pb), "one prefix per thread");
        let (ca, cb) = (
            u64::from_str_radix(ca, 16).unwrap(),
            u64::from_str_radix(cb, 16).unwrap(),
        );
        assert!(cb > ca, "the counter grows: {ca} then {cb}");
        // another thread: its own prefix (ids never collide across the I/O threads)
        let c = std::thread::spawn(new_request_id).join().unwrap();
        let (pc, _) = c.to_str().unwrap().split_once('-').unwrap();
        assert_ne!(pc, pa, "each thread draws its own prefix");
    }
}
