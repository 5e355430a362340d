//! `geo-operator`: see `geo-operator --help` and DESIGN §7.

mod api;
mod build;
mod cli;
mod controller;
mod error;
mod metrics;
mod status;

use clap::Parser;
use cli::{Cli, LogFormat};
use controller::{ContextParts, KeyCache, StatusSettings};
use futures::StreamExt;
use geoforge_crds::GeoSite;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("geo-operator: {e}");
        return ExitCode::from(2);
    }
    init_tracing(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("geo-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "geo-operator stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let config = kube::Config::infer().await?;
    let counter = metrics.api_requests.clone();
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |req: http::Request<kube::client::Body>| {
                counter.inc();
                req
            },
        ))
        .build();

    // Shutdown: one watch channel every task listens to.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            futures::FutureExt::shared(futures::FutureExt::boxed(async move {
                let _ = rx.wait_for(|s| *s).await;
            }))
        }
    };

    // Always on (leader or not): the GeoSite cache behind the proxy-config API and /readyz.
    let local_sites: std::collections::BTreeSet<String> = cli.local_sites.iter().cloned().collect();
    let (api_sites, api_writer) = reflector::store::<GeoSite>();
    let ready = Arc::new(AtomicBool::new(false));
    {
        let api = controller::scoped::<GeoSite>(&client, cli.namespace.as_deref());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(api_writer)
            .for_each(|_| futures::future::ready(()));
        let stop = stopped();
        tokio::spawn(async move {
            tokio::select! { _ = stream => {}, _ = stop => {} }
        });
        let reader = api_sites.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            if reader.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::Relaxed);
            }
        });
    }

    let api_state = Arc::new(api::ApiState {
        sites: api_sites,
        local_sites: local_sites.clone(),
    });
    let health_state = Arc::new(api::HealthState {
        metrics: metrics.clone(),
        ready,
    });
    let api_listener = tokio::net::TcpListener::bind(cli.api_listen).await?;
    let health_listener = tokio::net::TcpListener::bind(cli.metrics_listen).await?;
    tracing::info!(api = %cli.api_listen, metrics = %cli.metrics_listen, local_sites = ?cli.local_sites, "geo-operator starting");
    let api_server = tokio::spawn(
        axum::serve(api_listener, api::proxy_router(api_state))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );
    let health_server = tokio::spawn(
        axum::serve(health_listener, api::health_router(health_state))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );

    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("geo-operator-{}", std::process::id()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "geoforge-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let keys: KeyCache = Arc::default();
    let parts = {
        let client = client.clone();
        let cli = cli.clone();
        let metrics = metrics.clone();
        move || ContextParts {
            client: client.clone(),
            namespace: cli.namespace.clone(),
            local_sites: cli.local_sites.iter().cloned().collect(),
            defaults: build::Defaults {
                sidecar_image: cli.sidecar_image.clone(),
                proxy_config_url: cli.proxy_config_url.trim_end_matches('/').to_string(),
            },
            recorder: recorder.clone(),
            metrics: metrics.clone(),
            keys: keys.clone(),
            status: StatusSettings {
                urls: match &cli.status_base_url {
                    Some(u) => status::StatusUrls::Fixed(u.clone()),
                    None => status::StatusUrls::Cluster,
                },
                interval: cli.status_interval,
            },
        }
    };

    let leading = async {
        if !cli.leader_election {
            metrics.leader.set(1);
            controller::run(parts(), stopped()).await;
            return Ok::<(), anyhow::Error>(());
        }
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &cli.lease_name)
            .with_namespace(&cli.lease_namespace)
            .with_identity(&identity)
            .with_field_manager("geoforge-operator")
            .build()
            .await?;
        let (mut is_leader, lease_task) = manager.watch().await;
        loop {
            // Wait to become the leader (or to stop).
            let mut stop = stop_rx.clone();
            tokio::select! {
                r = is_leader.wait_for(|l| *l) => {
                    // The lease task only ends on an error it could not retry: let the
                    // Deployment restart us rather than idle without ever leading.
                    if r.is_err() {
                        anyhow::bail!("leader election stopped");
                    }
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            tracing::info!(%identity, "became the leader: starting controllers");
            metrics.leader.set(1);
            // Controllers stop on shutdown or on losing the lease.
            let (lost_tx, lost_rx) = watch::channel(false);
            let until = {
                let mut lost = lost_rx.clone();
                let stop = stopped();
                async move {
                    tokio::select! { _ = lost.wait_for(|l| *l) => {}, _ = stop => {} }
                }
            };
            let until = futures::FutureExt::shared(Box::pin(until));
            let controllers = controller::run(parts(), until);
            tokio::pin!(controllers);
            let mut stop = stop_rx.clone();
            tokio::select! {
                _ = &mut controllers => {}
                // Lost the lease, or the lease task ended (then we cannot know: stop too).
                _ = is_leader.wait_for(|l| !*l) => {
                    tracing::warn!("lost the leader lease: stopping controllers");
                    let _ = lost_tx.send(true);
                    controllers.await;
                }
                _ = stop.wait_for(|s| *s) => { controllers.await; }
            }
            metrics.leader.set(0);
            if *stop_rx.borrow() {
                break;
            }
        }
        // Closing the channel makes the lease task release the lease and return, so the next
        // replica takes over at once instead of after the lease expires.
        drop(is_leader);
        if let Ok(Err(e)) = lease_task.await {
            tracing::warn!(error = %e, "could not release the leader lease");
        }
        Ok(())
    };

    let signal = async {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    };
    tokio::pin!(leading);
    let lead = tokio::select! {
        r = &mut leading => r,
        // Once the signal arrives the leading future winds down by itself.
        _ = signal => leading.await,
    };
    let _ = stop_tx.send(true);
    lead?;
    let _ = api_server.await;
    let _ = health_server.await;
    Ok(())
}
