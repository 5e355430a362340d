//! The controllers (`GeoSite`, `Replicable`), their shared context, and how they are wired to
//! watches.
//!
//! No finalizer is used: everything the operator creates for a site is owned by the `GeoSite`
//! (controller owner references) and garbage-collected with it, except the key Secret, which
//! must outlive it on purpose; PVCs are retained by the StatefulSet's retention policy. There
//! is no external state to clean up, so a finalizer would only add a way to wedge deletes.

pub mod geosite;
pub mod replicable;
pub mod validate;

use crate::build::Defaults;
use crate::metrics::Metrics;
use futures::{Stream, StreamExt};
use geoforge_crds::auth::SigningKey;
use geoforge_crds::geosite::SiteRole;
use geoforge_crds::{GeoSite, Replicable};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Signing keys of the local sites, by `namespace/site` (filled by the `GeoSite` reconciler).
pub type KeyCache = Arc<RwLock<HashMap<String, SigningKey>>>;

/// What the reconcilers share.
pub struct Context {
    pub client: Client,
    /// Every `GeoSite` of the watch scope (local and peers).
    pub sites: Store<GeoSite>,
    pub replicables: Store<Replicable>,
    pub local_sites: BTreeSet<String>,
    pub defaults: Defaults,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub keys: KeyCache,
    pub backoff: Backoff,
}

/// `namespace/name` of an object.
pub fn key_of<K: Resource>(obj: &K) -> String {
    format!(
        "{}/{}",
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

/// Per-object exponential backoff for failed reconciles: 5 s doubling to 5 min (1 s for
/// conflicts, which usually clear at once). Reset by a successful reconcile. No hot loop:
/// an invalid spec is retried at most every 5 minutes until it changes (a change triggers
/// a reconcile through the watch anyway).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(300);

    pub fn next(&self, key: &str, transient: bool) -> Duration {
        let mut f = self.failures.lock().expect("backoff lock");
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let base = if transient { 1 } else { 5 };
        let secs = base * 2u64.saturating_pow(n.saturating_sub(1).min(10));
        Duration::from_secs(secs).min(Self::MAX)
    }

    pub fn reset(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
    }
}

/// Passes an object on when its `metadata.generation` changed ([`predicates::generation`]) or
/// when it was deleted, so the operator's own status writes never retrigger a reconcile but
/// deletions still do (a deleted `Replicable` must leave the sidecar configs).
pub fn generation_changes<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + Send + 'static,
{
    let seen: Arc<Mutex<HashMap<String, Option<u64>>>> = Arc::default();
    events.flat_map(move |ev| {
        let seen = seen.clone();
        let out: Vec<Result<K, watcher::Error>> = match ev {
            Err(e) => vec![Err(e)],
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let key = obj_key(&o);
                let g = predicates::generation(&o);
                let mut seen = seen.lock().expect("predicate lock");
                if g.is_some() && seen.get(&key) == Some(&g) {
                    vec![]
                } else {
                    seen.insert(key, g);
                    vec![Ok(o)]
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.lock().expect("predicate lock").remove(&obj_key(&o));
                vec![Ok(o)]
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => vec![],
        };
        futures::stream::iter(out)
    })
}

fn obj_key<K: Resource>(o: &K) -> String {
    o.meta().uid.clone().unwrap_or_else(|| key_of(o))
}

/// The local sites a `Replicable` concerns: the primary (serves every catalog) and the
/// secondaries it applies to.
pub fn sites_of_replicable(
    rep: &Replicable,
    sites: &Store<GeoSite>,
    local: &BTreeSet<String>,
) -> Vec<ObjectRef<GeoSite>> {
    sites
        .state()
        .iter()
        .filter(|s| local.contains(&s.name_any()))
        .filter(|s| match s.spec.role {
            SiteRole::Primary => true,
            SiteRole::Secondary => rep.spec.applies_to(&s.name_any()),
            SiteRole::Disabled => false,
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// Runs both controllers until `shutdown` resolves. Called while this replica is the leader.
pub async fn run(
    ctx_parts: ContextParts,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let ContextParts {
        client,
        namespace,
        local_sites,
        defaults,
        recorder,
        metrics,
        keys,
        status,
    } = ctx_parts;
    let sites_api: Api<GeoSite> = scoped(&client, namespace.as_deref());
    let reps_api: Api<Replicable> = scoped(&client, namespace.as_deref());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=geoforge-operator");

    let (site_reader, site_writer) = reflector::store();
    let site_events = watcher(sites_api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(site_writer);
    let (rep_reader, rep_writer) = reflector::store();
    let rep_events = watcher(reps_api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(rep_writer);

    // A site's spec change can change every local site's config (primary URL, trusted keys):
    // fan each change out to all local sites.
    let (fan_tx, fan_rx) = futures::channel::mpsc::unbounded::<ObjectRef<GeoSite>>();
    let fan_reader = site_reader.clone();
    let fan_local = local_sites.clone();
    let site_trigger = generation_changes(site_events).inspect(move |r| {
        if let Ok(changed) = r {
            for s in fan_reader.state() {
                if fan_local.contains(&s.name_any()) && s.name_any() != changed.name_any() {
                    let _ = fan_tx.unbounded_send(ObjectRef::from_obj(s.as_ref()));
                }
            }
        }
    });
    let map_reader = site_reader.clone();
    let map_local = local_sites.clone();

    let ctx = Arc::new(Context {
        client: client.clone(),
        sites: site_reader.clone(),
        replicables: rep_reader.clone(),
        local_sites: local_sites.clone(),
        defaults,
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        keys: keys.clone(),
        backoff: Backoff::default(),
    });

    let site_controller = Controller::for_stream(site_trigger, site_reader.clone())
        .owns(
            scoped::<StatefulSet>(&client, namespace.as_deref()),
            owned.clone(),
        )
        .owns(
            scoped::<Service>(&client, namespace.as_deref()),
            owned.clone(),
        )
        .owns(
            scoped::<ConfigMap>(&client, namespace.as_deref()),
            owned.clone(),
        )
        .watches_stream(generation_changes(rep_events), move |rep| {
            sites_of_replicable(&rep, &map_reader, &map_local)
        })
        .reconcile_on(fan_rx)
        .graceful_shutdown_on(shutdown.clone())
        .run(geosite::reconcile, geosite::error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "geosite controller");
            }
            futures::future::ready(())
        });

    let rep_ctx = Arc::new(replicable::RepContext {
        client: client.clone(),
        sites: site_reader.clone(),
        metrics: metrics.clone(),
        backoff: Backoff::default(),
    });
    let rep_controller = Controller::new(reps_api, watcher::Config::default())
        .graceful_shutdown_on(shutdown.clone())
        .run(replicable::reconcile, replicable::error_policy, rep_ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "replicable controller");
            }
            futures::future::ready(())
        });

    let aggregator = crate::status::run(
        crate::status::Aggregator {
            client,
            sites: site_reader,
            replicables: rep_reader,
            local_sites,
            keys,
            metrics,
            urls: status.urls,
            recorder,
        },
        status.interval,
        shutdown,
    );
    tokio::join!(site_controller, rep_controller, aggregator);
}

/// Inputs of [`run`] (everything but the stores, which it builds).
pub struct ContextParts {
    pub client: Client,
    pub namespace: Option<String>,
    pub local_sites: BTreeSet<String>,
    pub defaults: Defaults,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub keys: KeyCache,
    pub status: StatusSettings,
}

/// Status aggregation settings.
pub struct StatusSettings {
    pub urls: crate::status::StatusUrls,
    pub interval: Duration,
}

/// An `Api` over the watch scope: one namespace, or all.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.next("a", false), Duration::from_secs(5));
        assert_eq!(b.next("a", false), Duration::from_secs(10));
        assert_eq!(b.next("a", false), Duration::from_secs(20));
        for _ in 0..20 {
            b.next("a", false);
        }
        assert_eq!(b.next("a", false), Backoff::MAX);
        b.reset("a");
        assert_eq!(b.next("a", true), Duration::from_secs(1));
        assert_eq!(b.next("b", false), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn generation_filter_drops_status_only_updates_but_keeps_deletes() {
        use crate::build::testdata::tokyo;
        let a = tokyo();
        let mut status_only = a.clone();
        status_only.metadata.resource_version = Some("2".into());
        let mut spec_change = a.clone();
        spec_change.metadata.generation = Some(2);
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(a.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(status_only)),
            Ok(watcher::Event::Apply(spec_change)),
            Ok(watcher::Event::Delete(a)),
        ]);
        let out: Vec<_> = generation_changes(events)
            .map(|r| r.unwrap().metadata.generation)
            .collect()
            .await;
        assert_eq!(out, [Some(1), Some(2), Some(1)]);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests_reconcile;
