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
use kube::core::PartialObjectMeta;
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
    generation_changes_with(events, |_: &K| {})
}

/// [`generation_changes`], calling `on_change` for every change after the initial listing
/// (not for the objects of a (re)list: those are all reconciled anyway).
pub fn generation_changes_with<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    on_change: impl Fn(&K) + Send + Sync + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + Send + 'static,
{
    let seen: Arc<Mutex<HashMap<String, Option<u64>>>> = Arc::default();
    let on_change = Arc::new(on_change);
    events.flat_map(move |ev| {
        let seen = seen.clone();
        // Records the object's generation; true when it is the one already seen.
        let unchanged = |o: &K| {
            let g = predicates::generation(o);
            let prev = seen.lock().expect("predicate lock").insert(obj_key(o), g);
            g.is_some() && prev == Some(g)
        };
        let out: Vec<Result<K, watcher::Error>> = match ev {
            Err(e) => vec![Err(e)],
            Ok(watcher::Event::Apply(o)) => {
                if unchanged(&o) {
                    vec![]
                } else {
                    on_change(&o);
                    vec![Ok(o)]
                }
            }
            Ok(watcher::Event::InitApply(o)) => {
                if unchanged(&o) {
                    vec![]
                } else {
                    vec![Ok(o)]
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.lock().expect("predicate lock").remove(&obj_key(&o));
                on_change(&o);
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
    let site_trigger = generation_changes_with(site_events, move |changed: &GeoSite| {
        for s in fan_reader.state() {
            if fan_local.contains(&s.name_any()) && s.name_any() != changed.name_any() {
                let _ = fan_tx.unbounded_send(ObjectRef::from_obj(s.as_ref()));
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
        // Owned objects are watched as metadata only (ConfigMaps of large deployments are big),
        // filtered by label: any change (e.g. StatefulSet readiness) triggers the owner.
        .owns_stream(owned_changes::<StatefulSet>(&client, namespace.as_deref()))
        .owns_stream(owned_changes::<Service>(&client, namespace.as_deref()))
        .owns_stream(owned_changes::<ConfigMap>(&client, namespace.as_deref()))
        .watches_stream(generation_changes(rep_events), move |rep| {
            sites_of_replicable(&rep, &map_reader, &map_local)
        })
        .reconcile_on(fan_rx)
        // Coalesce bursts (a peer change fans out to every local site).
        .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_secs(1)))
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
    // Its own watch, generation-filtered too: the status writes of the aggregation never
    // retrigger it.
    let (own_rep_reader, own_rep_writer) = reflector::store();
    let own_reps = generation_changes(
        watcher(reps_api, watcher::Config::default())
            .default_backoff()
            .reflect(own_rep_writer),
    );
    let rep_controller = Controller::for_stream(own_reps, own_rep_reader)
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

/// Metadata-only changes of the objects the operator manages, by label.
fn owned_changes<K>(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let cfg = watcher::Config::default().labels("app.kubernetes.io/managed-by=geoforge-operator");
    // An `Api<PartialObjectMeta<K>>` makes metadata-only list and watch requests.
    watcher(scoped::<PartialObjectMeta<K>>(client, namespace), cfg)
        .default_backoff()
        .touched_objects()
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

    #[test]
    fn a_replicable_change_rerenders_the_sites_it_concerns() {
        use crate::build::testdata::{berlin_container, paris, replicables, tokyo};
        let (reader, mut writer) = reflector::store();
        let mut disabled = berlin_container();
        disabled.spec.role = SiteRole::Disabled;
        for s in [paris(), tokyo(), disabled] {
            writer.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let names = |rep: &Replicable, local: &[&str]| {
            let local: BTreeSet<String> = local.iter().map(|s| s.to_string()).collect();
            let mut n: Vec<String> = sites_of_replicable(rep, &reader, &local)
                .into_iter()
                .map(|r| r.name)
                .collect();
            n.sort();
            n
        };
        let reps = replicables();
        // For every secondary: the primary (serves the catalog) and tokyo; never a disabled site.
        assert_eq!(
            names(&reps[0], &["paris", "tokyo", "berlin"]),
            ["paris", "tokyo"]
        );
        // Only for london: just the primary here.
        assert_eq!(names(&reps[1], &["paris", "tokyo", "berlin"]), ["paris"]);
        // Peers are never triggered.
        assert_eq!(names(&reps[0], &["tokyo"]), ["tokyo"]);
    }

    #[tokio::test]
    async fn fan_out_skips_the_initial_listing() {
        use crate::build::testdata::{paris, tokyo};
        let mut t2 = tokyo();
        t2.metadata.generation = Some(2);
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(paris())),
            Ok(watcher::Event::InitApply(tokyo())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(tokyo())),
            Ok(watcher::Event::Apply(t2)),
        ]);
        let changed: Arc<Mutex<Vec<String>>> = Arc::default();
        let c = changed.clone();
        let passed = generation_changes_with(events, move |s: &GeoSite| {
            c.lock().unwrap().push(s.name_any())
        })
        .count()
        .await;
        assert_eq!(passed, 3);
        assert_eq!(*changed.lock().unwrap(), ["tokyo"]);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests_reconcile;
