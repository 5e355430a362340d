//! HTTP client for the primary's Geo API (DESIGN §4), with GL-Geo tokens and the
//! `Geo-Api-Version` check.

use crate::context::SiteContext;
use bytes::Bytes;
use geoforge_crds::auth::{Scope, TokenData};
use geoforge_crds::wire::{self, CatalogPage, EventsGone, EventsPage, StatusReport};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Errors talking to the primary.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("primary unreachable: {0}")]
    Unreachable(String),
    #[error(
        "the primary speaks Geo API version {theirs}, this secondary speaks {ours}: refusing to sync across major versions"
    )]
    Version { theirs: String, ours: String },
    #[error("primary answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("bad response from the primary: {0}")]
    Bad(String),
}

/// Result of an events poll.
pub enum EventsResult {
    Page(EventsPage),
    Gone(EventsGone),
}

/// A response whose head was read; the body is still streaming.
pub type Response = http::Response<hyper::body::Incoming>;

/// Client for one primary URL.
#[derive(Clone)]
pub struct GeoClient {
    http: Client<crate::proxy::upstream::Connector, Full<Bytes>>,
    ctx: SiteContext,
    /// The primary's site id (the `aud` of our tokens).
    pub aud: String,
    connect_timeout: Duration,
}

/// The primary's site id, derived from the trusted keys: the site of the first configured
/// trusted key that is not this site's own. (DESIGN does not say how a secondary learns the
/// primary's site id; the trusted keys are the only configured source. With several peer
/// sites configured, the first one listed is taken as the primary and a warning is logged.)
pub fn primary_site(ctx: &SiteContext) -> Option<String> {
    let own = ctx.site_id();
    let mut peers: Vec<&str> = vec![];
    for k in &ctx.config.keys.trusted {
        let s = k.site();
        if s != own && !peers.contains(&s) {
            peers.push(s);
        }
    }
    if peers.len() > 1 {
        tracing::warn!(
            chosen = peers[0],
            others = ?&peers[1..],
            "several peer sites in keys.trusted: taking the first as the primary (token audience)"
        );
    }
    peers.first().map(|s| s.to_string())
}

impl GeoClient {
    pub fn new(ctx: &SiteContext, aud: String) -> GeoClient {
        // http or https (cross-site URLs are https unless `allowInsecure`).
        let conn = crate::proxy::upstream::connector(ctx.config.proxy.connect_timeout);
        let http = Client::builder(TokioExecutor::new())
            // Below the primary's idle close (see `proxy.poolIdleTimeout`): a status report
            // must not race the server closing a pooled connection.
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(ctx.config.proxy.pool_idle_timeout)
            .pool_max_idle_per_host(64)
            .build(conn);
        GeoClient {
            http,
            ctx: ctx.clone(),
            aud,
            connect_timeout: ctx.config.proxy.connect_timeout,
        }
    }

    /// `Authorization` value for `data`.
    pub fn authorization(&self, data: &TokenData) -> String {
        self.ctx.signing_key.authorization(&self.aud, data)
    }

    /// `Authorization` value valid for the longest allowed time (git fetches of large repos).
    pub fn long_authorization(&self, data: &TokenData) -> String {
        format!(
            "{} {}:{}",
            geoforge_crds::auth::SCHEME,
            self.ctx.signing_key.kid,
            self.ctx
                .signing_key
                .mint(&self.aud, data, Duration::from_secs(60))
        )
    }

    /// Sends a request and returns the response head once received (within `head_timeout`),
    /// after checking `Geo-Api-Version`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        auth: String,
        body: Option<Vec<u8>>,
        head_timeout: Duration,
    ) -> Result<Response, ApiError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ApiError::Unreachable(format!(
                "the primary URL must be http(s):// (got {})",
                url.split('/').take(3).collect::<Vec<_>>().join("/")
            )));
        }
        let mut b = Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::AUTHORIZATION, auth)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("geo-sidecar/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some(bytes) => {
                b = b.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let req = b
            .body(body)
            .map_err(|e| ApiError::Bad(format!("request: {e}")))?;
        let resp =
            tokio::time::timeout(head_timeout + self.connect_timeout, self.http.request(req))
                .await
                .map_err(|_| ApiError::Unreachable(format!("no answer within {head_timeout:?}")))?
                .map_err(|e| ApiError::Unreachable(error_chain(&e)))?;
        check_version(&resp)?;
        Ok(resp)
    }

    /// Reads a whole (small) body with a timeout.
    pub async fn body(resp: Response, timeout: Duration) -> Result<Bytes, ApiError> {
        let collected = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| ApiError::Unreachable("body not received in time".into()))?
            .map_err(|e| ApiError::Unreachable(error_chain(&e)))?;
        Ok(collected.to_bytes())
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: Response,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let status = resp.status();
        let body = Self::body(resp, timeout).await?;
        if !status.is_success() {
            return Err(ApiError::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::Bad(e.to_string()))
    }

    /// `GET /api/v4/geo/events?after=&limit=&wait=`.
    pub async fn events(
        &self,
        base: &str,
        after: i64,
        limit: usize,
        wait: Duration,
    ) -> Result<EventsResult, ApiError> {
        let url = format!(
            "{}/api/v4/geo/events?after={after}&limit={limit}&wait={}",
            base.trim_end_matches('/'),
            wait.as_secs()
        );
        let auth = self.authorization(&TokenData::scope(Scope::Events));
        let resp = self
            .send(
                Method::GET,
                &url,
                auth,
                None,
                wait + Duration::from_secs(15),
            )
            .await?;
        if resp.status() == StatusCode::GONE {
            let body = Self::body(resp, Duration::from_secs(15)).await?;
            return serde_json::from_slice(&body)
                .map(EventsResult::Gone)
                .map_err(|e| ApiError::Bad(format!("410 body: {e}")));
        }
        Ok(EventsResult::Page(
            self.json(resp, Duration::from_secs(30)).await?,
        ))
    }

    /// `GET /api/v4/geo/replicables/{r}?after=&limit=`.
    pub async fn catalog(
        &self,
        base: &str,
        replicable: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<CatalogPage, ApiError> {
        let mut url = format!(
            "{}/api/v4/geo/replicables/{}?limit={limit}",
            base.trim_end_matches('/'),
            crate::items::encode_item_segment(replicable)
        );
        if let Some(a) = after {
            url.push_str("&after=");
            url.push_str(&crate::items::encode_item_segment(a));
        }
        let auth = self.authorization(&TokenData::catalog(replicable));
        let resp = self
            .send(Method::GET, &url, auth, None, Duration::from_secs(60))
            .await?;
        self.json(resp, Duration::from_secs(60)).await
    }

    /// `GET /api/v4/geo/retrieve/{r}/{id}`; the caller handles statuses and streams the body.
    pub async fn retrieve(
        &self,
        base: &str,
        replicable: &str,
        item_id: &str,
        checksum: &str,
    ) -> Result<Response, ApiError> {
        let url = format!(
            "{}/api/v4/geo/retrieve/{}/{}",
            base.trim_end_matches('/'),
            crate::items::encode_item_segment(replicable),
            crate::items::encode_item_segment(item_id)
        );
        let auth = self.authorization(&TokenData::retrieve(replicable, item_id, checksum));
        self.send(Method::GET, &url, auth, None, Duration::from_secs(60))
            .await
    }

    /// `POST /api/v4/geo/status`.
    pub async fn post_status(&self, base: &str, report: &StatusReport) -> Result<(), ApiError> {
        let url = format!("{}/api/v4/geo/status", base.trim_end_matches('/'));
        let auth = self.authorization(&TokenData::scope(Scope::Status));
        let body = serde_json::to_vec(report).map_err(|e| ApiError::Bad(e.to_string()))?;
        let resp = self
            .send(
                Method::POST,
                &url,
                auth,
                Some(body),
                Duration::from_secs(30),
            )
            .await?;
        let status = resp.status();
        let body = Self::body(resp, Duration::from_secs(30)).await?;
        if !status.is_success() {
            return Err(ApiError::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(())
    }

    /// URL of a repository on the Geo repository endpoint (git appends `/info/refs`…).
    pub fn repository_url(base: &str, replicable: &str, item_id: &str) -> String {
        format!(
            "{}/api/v4/geo/repositories/{}/{}",
            base.trim_end_matches('/'),
            crate::items::encode_item_segment(replicable),
            crate::items::encode_item_segment(item_id)
        )
    }
}

/// Refuses responses from another major Geo API version. A response without the header
/// (not a Geo API, e.g. a misrouted URL) is let through to fail on its own status/body.
fn check_version(resp: &Response) -> Result<(), ApiError> {
    let Some(v) = resp
        .headers()
        .get(wire::GEO_API_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(());
    };
    let ours = geoforge_crds::GEO_API_VERSION;
    if geoforge_crds::api_major(v) != geoforge_crds::api_major(ours) {
        return Err(ApiError::Version {
            theirs: v.to_string(),
            ours: ours.to_string(),
        });
    }
    Ok(())
}

/// An error with its sources, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
