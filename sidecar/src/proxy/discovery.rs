//! Learning the primary's internal URL (DESIGN §3): poll the internal API, or a static URL.
//!
//! - `primary.internalApi` set: `GET {internalApi}/api/v4/geo/proxy` every
//!   `primary.pollInterval` ± 20 %, with `Authorization: GL-Geo <kid>:<JWT>` of scope
//!   `proxy-config`. The token's **audience is this site's own id**: the operator verifies
//!   the call *as the calling site* (with that site's public key, which is in its `GeoSite`)
//!   and answers for it, so there is no separate operator audience to configure. If
//!   `primary.staticUrl` is set too, it is the value used until the first successful poll.
//! - Only `primary.staticUrl`: that URL, fixed (standalone).
//!
//! On any poll error (connect, timeout, non-200, bad JSON, a URL that is not http(s) — or
//! `http` without `allowInsecure`) the last good value is kept. State changes (a new URL,
//! failing ↔ working) are logged once, not once per poll. `geo_enabled: false` or a null URL
//! is "primary unknown" (`None`), which the request path answers with 503.

use crate::context::{PrimaryWatch, SiteContext};
use crate::proxy::metrics::{DiscoveryMetrics, PollLabels};
use crate::proxy::upstream::Upstream;
use axum::body::Body;
use geoforge_crds::auth::{Scope, TokenData};
use geoforge_crds::wire::ProxyConfig;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use rand::Rng;
use std::time::{Duration, Instant};

/// Largest proxy-config response read.
const MAX_BODY: usize = 64 * 1024;

/// Starts discovery and returns the watch of the primary URL.
pub fn start(ctx: &SiteContext) -> PrimaryWatch {
    let p = ctx
        .config
        .primary
        .clone()
        .unwrap_or_else(|| geoforge_crds::config::PrimaryDiscovery {
            internal_api: None,
            static_url: None,
            poll_interval: Duration::from_secs(10),
        });
    let initial = p.static_url.clone();
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let shutdown = ctx.shutdown.clone();
    match p.internal_api.clone() {
        Some(api) => {
            let metrics = DiscoveryMetrics::register(&ctx.metrics);
            let ctx = ctx.clone();
            tokio::spawn(async move {
                poll_loop(ctx, api, p.poll_interval, tx, metrics).await;
            });
        }
        None => {
            tracing::info!(primary = ?p.static_url, "primary URL from the config file (static)");
            // Keep the sender alive for the life of the process.
            tokio::spawn(async move {
                shutdown.cancelled().await;
                drop(tx);
            });
        }
    }
    rx
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Starting,
    Ok(Option<String>),
    Failing,
}

async fn poll_loop(
    ctx: SiteContext,
    api: String,
    interval: Duration,
    tx: tokio::sync::watch::Sender<Option<String>>,
    metrics: DiscoveryMetrics,
) {
    let client = Upstream::new(&ctx.config.proxy);
    let url = format!("{}/api/v4/geo/proxy", api.trim_end_matches('/'));
    let mut state = State::Starting;
    let mut last_success: Option<Instant> = None;
    let started = Instant::now();
    loop {
        let result = poll_once(&ctx, &client, &url).await;
        match result {
            Ok(primary) => {
                metrics
                    .polls
                    .get_or_create(&PollLabels { result: "success" })
                    .inc();
                last_success = Some(Instant::now());
                let new_state = State::Ok(primary.clone());
                if new_state != state {
                    match &primary {
                        Some(u) => {
                            tracing::info!(primary = %u, "primary URL from the internal API")
                        }
                        None => tracing::warn!(
                            "the internal API knows no primary: proxied requests get 503 until it does"
                        ),
                    }
                }
                state = new_state;
                tx.send_if_modified(|cur| {
                    if *cur != primary {
                        *cur = primary;
                        true
                    } else {
                        false
                    }
                });
            }
            Err(e) => {
                metrics
                    .polls
                    .get_or_create(&PollLabels { result: "failure" })
                    .inc();
                if state != State::Failing {
                    tracing::warn!(internal_api = %api, error = %e,
                        current = ?*tx.borrow(), "polling the proxy config failed; keeping the last good config");
                }
                state = State::Failing;
            }
        }
        let age = last_success.unwrap_or(started).elapsed().as_secs_f64();
        metrics.config_age.set(age);
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        let wait = interval.mul_f64(jitter).max(Duration::from_millis(50));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn poll_once(
    ctx: &SiteContext,
    client: &Upstream,
    url: &str,
) -> Result<Option<String>, String> {
    // aud = our own site id: see the module docs.
    let auth = ctx
        .signing_key
        .authorization(ctx.site_id(), &TokenData::scope(Scope::ProxyConfig));
    let mut req = Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(Body::empty())
        .map_err(|e| format!("bad internal API URL: {e}"))?;
    let mut v = http::HeaderValue::from_str(&auth).map_err(|_| "token".to_string())?;
    v.set_sensitive(true);
    req.headers_mut().insert(header::AUTHORIZATION, v);
    let limit = ctx.config.proxy.connect_timeout + Duration::from_secs(10);
    let fut = async {
        let resp = client.send_simple(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the response: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!("status {status}"));
        }
        Ok(body)
    };
    let body = tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    let cfg: ProxyConfig =
        serde_json::from_slice(&body).map_err(|e| format!("bad proxy config JSON: {e}"))?;
    if !cfg.geo_enabled {
        return Ok(None);
    }
    match cfg.geo_proxy_url {
        None => Ok(None),
        Some(u) if u.trim().is_empty() => Ok(None),
        Some(u) => {
            let parsed = url::Url::parse(&u).map_err(|e| format!("bad geo_proxy_url: {e}"))?;
            match parsed.scheme() {
                "https" => {}
                "http" if ctx.config.allow_insecure => {}
                s => return Err(format!("geo_proxy_url scheme {s:?} not allowed")),
            }
            if parsed.host_str().is_none() {
                return Err("geo_proxy_url has no host".into());
            }
            Ok(Some(u))
        }
    }
}
