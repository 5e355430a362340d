//! HTTP: the internal proxy-config API (`GET /api/v4/geo/proxy`, DESIGN §3) on one listener,
//! and `/metrics`, `/healthz`, `/readyz` on another. Served by every operator replica (not only
//! the leader) from an always-on `GeoSite` reflector, so sidecars keep getting answers during
//! a leader change.

use crate::build::configmap::the_primary;
use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use geoforge_crds::GeoSite;
use geoforge_crds::auth::{AuthError, KeyRing, Scope};
use geoforge_crds::geosite::SiteRole;
use geoforge_crds::wire::ProxyConfig;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What the proxy-config API reads.
pub struct ApiState {
    pub sites: Store<GeoSite>,
    pub local_sites: BTreeSet<String>,
}

/// What the health/metrics listener reads.
pub struct HealthState {
    pub metrics: Arc<Metrics>,
    /// Set once the `GeoSite` reflector has listed everything.
    pub ready: Arc<AtomicBool>,
}

pub fn proxy_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v4/geo/proxy", get(proxy_config))
        .with_state(state)
}

pub fn health_router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(st): State<Arc<HealthState>>) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "GeoSite cache not synced yet",
        )
            .into_response()
    }
}

async fn metrics(State(st): State<Arc<HealthState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn proxy_config(State(st): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let sites: Vec<GeoSite> = st.sites.state().iter().map(|s| (**s).clone()).collect();
    match answer(auth, &sites, &st.local_sites) {
        Ok(cfg) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(cfg)).into_response(),
        Err(e) => (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response(),
    }
}

/// The key ring that verifies tokens of `site`: the keys in its status (the operator-generated
/// key in use) and in its spec (declared keys, e.g. during rotation), of its own kid prefix only.
pub fn site_keyring(site: &GeoSite) -> KeyRing {
    let name = site.name_any();
    let prefix = format!("{name}.");
    let mut ring = KeyRing::new(Duration::from_secs(60));
    let status_keys = site.status.iter().flat_map(|s| s.public_keys.iter());
    for k in status_keys.chain(site.spec.public_keys.iter()) {
        if k.kid.starts_with(&prefix) && !ring.contains(&k.kid) {
            // A malformed key is skipped: its kid then fails as unknown.
            let _ = ring.add_ed25519(&k.kid, &name, &k.key);
        }
    }
    ring
}

/// Authenticates the calling site (its own `proxy-config` token, `aud` = its own id) and
/// answers for it.
pub fn answer(
    auth: Option<&str>,
    sites: &[GeoSite],
    local: &BTreeSet<String>,
) -> Result<ProxyConfig, AuthError> {
    let header = auth.ok_or(AuthError::Missing)?;
    let (_, token) = header.split_once(' ').ok_or(AuthError::Malformed)?;
    let (kid, _) = token.trim().split_once(':').ok_or(AuthError::Malformed)?;
    let site_id = kid.split('.').next().unwrap_or_default();
    let mut matching = sites
        .iter()
        .filter(|s| s.name_any() == site_id && local.contains(site_id));
    let site = match (matching.next(), matching.next()) {
        (Some(s), None) => s,
        // Unknown, not local, or ambiguous (same name in two namespaces).
        _ => return Err(AuthError::UnknownKey),
    };
    site_keyring(site).verify_authorization(Some(header), site_id, Scope::ProxyConfig)?;
    Ok(proxy_config_for(site, sites))
}

/// The answer for `site` (pure): a secondary gets the primary's internal URL (null when there
/// is no single primary: "primary unknown"); a primary or a disabled site gets null.
pub fn proxy_config_for(site: &GeoSite, sites: &[GeoSite]) -> ProxyConfig {
    match site.spec.role {
        SiteRole::Secondary => ProxyConfig {
            geo_enabled: true,
            geo_proxy_url: the_primary(sites).map(|p| p.spec.internal_url().to_string()),
            geo_proxy_extra_data: None,
        },
        SiteRole::Primary => ProxyConfig {
            geo_enabled: true,
            geo_proxy_url: None,
            geo_proxy_extra_data: None,
        },
        SiteRole::Disabled => ProxyConfig {
            geo_enabled: false,
            geo_proxy_url: None,
            geo_proxy_extra_data: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;
    use axum::body::Body;
    use geoforge_crds::auth::{SigningKey, TokenData, generate_key};
    use geoforge_crds::geosite::{GeoSiteStatus, PublicKey};
    use http_body_util::BodyExt;
    use kube::runtime::{reflector, watcher};
    use tower::ServiceExt;

    struct Fixture {
        router: Router,
        writer: reflector::store::Writer<GeoSite>,
        tokyo_key: SigningKey,
        paris_key: SigningKey,
    }

    fn with_status_key(mut site: GeoSite, kid: &str, key: &SigningKey) -> GeoSite {
        site.spec.public_keys.clear();
        site.status = Some(GeoSiteStatus {
            public_keys: vec![PublicKey {
                kid: kid.into(),
                key: key.public_key.clone().unwrap(),
            }],
            ..GeoSiteStatus::default()
        });
        site
    }

    fn fixture() -> Fixture {
        let t = generate_key();
        let p = generate_key();
        let tokyo_key = SigningKey::from_pem("tokyo.1", &t.private_pem).unwrap();
        let paris_key = SigningKey::from_pem("paris.1", &p.private_pem).unwrap();
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(with_status_key(
            tokyo(),
            "tokyo.1",
            &tokyo_key,
        )));
        writer.apply_watcher_event(&watcher::Event::Apply(with_status_key(
            paris(),
            "paris.1",
            &paris_key,
        )));
        let state = Arc::new(ApiState {
            sites: reader,
            local_sites: ["tokyo".to_string(), "paris".to_string()].into(),
        });
        Fixture {
            router: proxy_router(state),
            writer,
            tokyo_key,
            paris_key,
        }
    }

    async fn get(router: &Router, auth: Option<String>) -> (StatusCode, String) {
        let mut req = axum::http::Request::get("/api/v4/geo/proxy");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let resp = router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn proxy_token(key: &SigningKey, aud: &str) -> String {
        key.authorization(aud, &TokenData::scope(Scope::ProxyConfig))
    }

    #[tokio::test]
    async fn secondary_gets_the_primary_internal_url() {
        let f = fixture();
        let (s, body) = get(&f.router, Some(proxy_token(&f.tokyo_key, "tokyo"))).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let cfg: ProxyConfig = serde_json::from_str(&body).unwrap();
        assert_eq!(
            cfg,
            ProxyConfig {
                geo_enabled: true,
                geo_proxy_url: Some("https://geo.paris.example.com".into()),
                geo_proxy_extra_data: None
            }
        );
        assert!(body.contains("\"geo_proxy_url\""));
    }

    #[tokio::test]
    async fn primary_gets_null_and_role_change_shows_on_next_poll() {
        let mut f = fixture();
        let (s, body) = get(&f.router, Some(proxy_token(&f.paris_key, "paris"))).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.contains("\"geo_proxy_url\":null"), "{body}");
        // Promotion: tokyo becomes primary, paris secondary.
        let mut t = with_status_key(tokyo(), "tokyo.1", &f.tokyo_key);
        t.spec.role = SiteRole::Primary;
        t.spec.replicas = 1;
        let mut p = with_status_key(paris(), "paris.1", &f.paris_key);
        p.spec.role = SiteRole::Secondary;
        f.writer.apply_watcher_event(&watcher::Event::Apply(t));
        f.writer.apply_watcher_event(&watcher::Event::Apply(p));
        let (_, body) = get(&f.router, Some(proxy_token(&f.paris_key, "paris"))).await;
        let cfg: ProxyConfig = serde_json::from_str(&body).unwrap();
        assert_eq!(
            cfg.geo_proxy_url.as_deref(),
            Some("https://geo.tokyo.example.com")
        );
        let (_, body) = get(&f.router, Some(proxy_token(&f.tokyo_key, "tokyo"))).await;
        assert!(body.contains("\"geo_proxy_url\":null"), "{body}");
    }

    #[tokio::test]
    async fn disabled_site_gets_geo_disabled() {
        let mut f = fixture();
        let mut t = with_status_key(tokyo(), "tokyo.1", &f.tokyo_key);
        t.spec.role = SiteRole::Disabled;
        f.writer.apply_watcher_event(&watcher::Event::Apply(t));
        let (s, body) = get(&f.router, Some(proxy_token(&f.tokyo_key, "tokyo"))).await;
        assert_eq!(s, StatusCode::OK);
        let cfg: ProxyConfig = serde_json::from_str(&body).unwrap();
        assert!(!cfg.geo_enabled);
        assert_eq!(cfg.geo_proxy_url, None);
    }

    #[tokio::test]
    async fn refuses_bad_tokens_with_401() {
        let f = fixture();
        // No header.
        assert_eq!(get(&f.router, None).await.0, StatusCode::UNAUTHORIZED);
        // Wrong audience (signed for the primary instead of itself).
        let (s, body) = get(&f.router, Some(proxy_token(&f.tokyo_key, "paris"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body.trim(), "token is for another site");
        // Wrong scope.
        let t = f
            .tokyo_key
            .authorization("tokyo", &TokenData::scope(Scope::Admin));
        assert_eq!(get(&f.router, Some(t)).await.0, StatusCode::UNAUTHORIZED);
        // A key that is not the site's.
        let other = SigningKey::from_pem("tokyo.1", &generate_key().private_pem).unwrap();
        assert_eq!(
            get(&f.router, Some(proxy_token(&other, "tokyo"))).await.0,
            StatusCode::UNAUTHORIZED
        );
        // A site that is not local to this operator.
        let london = SigningKey::from_pem("london.1", &generate_key().private_pem).unwrap();
        let (s, body) = get(&f.router, Some(proxy_token(&london, "london"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body.trim(), "unknown key id");
        // Garbage.
        assert_eq!(
            get(&f.router, Some("Bearer x".into())).await.0,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn two_primaries_mean_primary_unknown() {
        let mut second = tokyo();
        second.metadata.name = Some("osaka".into());
        second.spec.role = SiteRole::Primary;
        let cfg = proxy_config_for(&tokyo(), &[paris(), second, tokyo()]);
        assert!(cfg.geo_enabled);
        assert_eq!(cfg.geo_proxy_url, None);
    }

    #[tokio::test]
    async fn health_endpoints() {
        let ready = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let router = health_router(Arc::new(HealthState {
            metrics,
            ready: ready.clone(),
        }));
        let call = |path: &'static str| {
            let r = router.clone();
            async move {
                r.oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap()
                    .status()
            }
        };
        assert_eq!(call("/healthz").await, StatusCode::OK);
        assert_eq!(call("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(call("/readyz").await, StatusCode::OK);
        assert_eq!(call("/metrics").await, StatusCode::OK);
    }
}
