//! Wires a sidecar together for its role and serves the service and admin ports until
//! shutdown.

use crate::context::PushSink;
use crate::context::SiteContext;
use crate::forge::EmbeddedForge;
use crate::metrics::Metrics;
use crate::proxy::front::{ForgeBackend, Front};
use crate::settings::Settings;
use crate::{primary::Primary, proxy, secondary::Secondary};
use axum::Router;
use axum::routing::get;
use geoforge_crds::geosite::SiteRole;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the sidecar until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let instance = settings.config.instance_name();
    let ctx = SiteContext {
        config: Arc::new(settings.config),
        signing_key: Arc::new(settings.signing_key),
        keyring: Arc::new(settings.keyring),
        metrics: Metrics::new(),
        shutdown: shutdown.clone(),
        instance,
    };
    crate::git::check_available()
        .await
        .map_err(anyhow::Error::msg)?;

    // The service port: the route table in `proxy::route`, served by `proxy::server`.
    let (front, admin_extra) = match ctx.config.role {
        SiteRole::Primary => {
            let primary = Primary::start(ctx.clone()).await?;
            let sink: Arc<dyn PushSink> = primary.clone();
            let forge = forge_backend(&ctx, Some(sink.clone()))?;
            let front = Front::new(
                ctx.clone(),
                Some(primary.geo_api()),
                Some(forge),
                None,
                Some(sink),
            )?;
            (front, primary.admin_routes())
        }
        SiteRole::Secondary => {
            let watch = proxy::discovery::start(&ctx);
            let secondary = Secondary::start(ctx.clone(), watch.clone()).await?;
            let accel = Arc::new(crate::accel::Accelerator::new(&ctx, secondary.clone())?);
            let front = Front::new(ctx.clone(), None, None, Some(watch), None)?
                .with_read_accelerator(accel);
            (front, secondary.admin_routes())
        }
        SiteRole::Disabled => {
            // Geo is off: a plain front of the forge, no event log to feed.
            let forge = forge_backend(&ctx, None)?;
            let front = Front::new(ctx.clone(), None, Some(forge), None, None)?;
            (front, Router::new())
        }
    };
    // The front lives as long as the process (nothing in it is cleaned up on drop): leaked once
    // here, each request's future borrows it for `'static` — no reference count is touched per
    // request, and the request can be consumed inside hyper's service call (`proxy::server`).
    let front: &'static Front = Box::leak(Box::new(front));

    let metrics = ctx.metrics.clone();
    let admin = Router::new()
        .route("/-/health", get(|| async { "ok\n" }))
        .route("/-/liveness", get(|| async { "ok\n" }))
        .route("/-/readiness", get(|| async { "ok\n" }))
        .route("/-/metrics", get(move || async move { metrics.encode() }))
        .merge(admin_extra);

    let service_listener = tokio::net::TcpListener::bind(&ctx.config.listen.service).await?;
    let admin_listener = tokio::net::TcpListener::bind(&ctx.config.listen.admin).await?;
    tracing::info!(
        site = %ctx.site_id(), role = ctx.config.role.as_str(), instance = %ctx.instance,
        service = %service_listener.local_addr()?, admin = %admin_listener.local_addr()?, "geo-sidecar started"
    );

    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    let s2 = shutdown.clone();
    let a = proxy::server::serve(
        service_listener,
        front,
        ctx.config.proxy.clone(),
        shutdown.clone(),
    );
    let b = async move {
        axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move { s2.cancelled().await })
            .await
            .map_err(anyhow::Error::from)
    };
    let (ra, rb) = tokio::join!(a, b);
    ra?;
    rb?;
    Ok(())
}

/// The forge of a primary or disabled site: embedded `git http-backend` or `forge.upstreamUrl`.
fn forge_backend(
    ctx: &SiteContext,
    sink: Option<Arc<dyn PushSink>>,
) -> anyhow::Result<ForgeBackend> {
    if let Some(f) = EmbeddedForge::new(ctx, sink)? {
        return Ok(ForgeBackend::Embedded(Arc::new(f)));
    }
    let url = ctx
        .config
        .forge
        .as_ref()
        .and_then(|f| f.upstream_url.as_deref())
        .ok_or_else(|| anyhow::anyhow!("forge: set forge.embedded or forge.upstreamUrl"))?;
    let url = url::Url::parse(url).map_err(|e| anyhow::anyhow!("forge.upstreamUrl: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("forge.upstreamUrl: only http:// and https:// are supported");
    }
    let base = crate::proxy::upstream::UpstreamBase::new(&url)
        .map_err(|e| anyhow::anyhow!("forge.upstreamUrl: {e}"))?;
    Ok(ForgeBackend::Upstream(Box::new(base)))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
