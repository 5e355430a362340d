//! The `GeoSite` controller: dereference → validate → build → apply → update status.

use super::Context;
use super::validate::{NO_PRIMARY, validate_site};
use crate::build::configmap::{checksum, configmap, sidecar_config};
use crate::build::secret::{key_secret, read_key_secret};
use crate::build::service::{client_service, headless_service};
use crate::build::statefulset::statefulset;
use crate::build::{FIELD_MANAGER, SiteKey, key_secret_name, paths};
use crate::error::{Error, Result, conflict_aware};
use geoforge_crds::auth::{SigningKey, generate_key};
use geoforge_crds::condition::{Condition, find, set_condition};
use geoforge_crds::geosite::{GeoSiteStatus, PublicKey, SiteRole};
use geoforge_crds::{GeoSite, Replicable};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

pub const CONTROLLER: &str = "geosite";
/// Periodic re-apply to repair drift even without a watch event.
pub const RESYNC: Duration = Duration::from_secs(600);

/// Reconciles one `GeoSite`.
pub async fn reconcile(site: Arc<GeoSite>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let result = reconcile_inner(&site, &ctx).await;
    if result.is_ok() {
        ctx.backoff.reset(&super::key_of(site.as_ref()));
    }
    result
}

/// Requeues a failed `GeoSite` with a per-object exponential backoff.
pub fn error_policy(site: Arc<GeoSite>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(site = %site.name_any(), %error, "reconcile failed");
    ctx.metrics.error(CONTROLLER, error.metric_label());
    Action::requeue(
        ctx.backoff
            .next(&super::key_of(site.as_ref()), error.is_transient()),
    )
}

/// Every site of the scope, with `site` itself as given (the store may lag behind it).
fn all_sites(ctx: &Context, site: &GeoSite) -> Vec<GeoSite> {
    let mut all: Vec<GeoSite> = ctx
        .sites
        .state()
        .iter()
        .filter(|s| !(s.name_any() == site.name_any() && s.namespace() == site.namespace()))
        .map(|s| (**s).clone())
        .collect();
    all.push(site.clone());
    all.sort_by_key(|s| (s.name_any(), s.namespace()));
    all
}

fn all_replicables(ctx: &Context) -> Vec<Replicable> {
    let mut r: Vec<Replicable> = ctx
        .replicables
        .state()
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .map(|r| (**r).clone())
        .collect();
    r.sort_by_key(|r| (r.name_any(), r.namespace()));
    r
}

fn unknown(
    type_: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        status: "Unknown".into(),
        ..Condition::new(type_, false, reason, message, generation)
    }
}

async fn reconcile_inner(site: &GeoSite, ctx: &Context) -> Result<Action> {
    let ns = site.namespace().ok_or(Error::MissingNamespace)?;
    let name = site.name_any();
    if site.metadata.deletion_timestamp.is_some() {
        // Owned objects go with it (garbage collection); the key Secret stays on purpose.
        return Ok(Action::await_change());
    }
    let generation = site.metadata.generation;
    let sites_api: Api<GeoSite> = Api::namespaced(ctx.client.clone(), &ns);
    let old_status = site.status.clone();
    let mut status = old_status.clone().unwrap_or_default();

    // Dereference.
    if !ctx.local_sites.contains(&name) {
        set_condition(
            &mut status.conditions,
            unknown(
                "Ready",
                "NotLocal",
                format!(
                    "{name} is not in this operator's --local-sites: it is a peer (its URLs and publicKeys are used), its workloads run in another cluster"
                ),
                generation,
            ),
        );
        status.observed_generation = generation;
        write_status(&sites_api, site, old_status.as_ref(), status).await?;
        return Ok(Action::await_change());
    }
    let all = all_sites(ctx, site);

    // Validate.
    let problems = validate_site(site, &all);
    if let Some(p) = problems.iter().find(|p| p.blocking) {
        let was = old_status
            .as_ref()
            .and_then(|s| find(&s.conditions, "Ready"))
            .map(|c| c.reason.clone());
        set_condition(
            &mut status.conditions,
            Condition::new("Ready", false, p.reason, &p.message, generation),
        );
        status.observed_generation = generation;
        write_status(&sites_api, site, old_status.as_ref(), status).await?;
        if was.as_deref() != Some(p.reason) {
            publish(
                ctx,
                site,
                EventType::Warning,
                p.reason,
                "Validate",
                &p.message,
            )
            .await;
        }
        return Err(Error::Invalid {
            reason: p.reason.to_string(),
            message: p.message.clone(),
        });
    }

    let (signing, key, generated) = match ensure_key(ctx, site, &ns).await {
        Ok(k) => k,
        Err(e @ Error::KeySecret { .. }) => {
            set_condition(
                &mut status.conditions,
                Condition::new(
                    "Ready",
                    false,
                    "KeySecretInvalid",
                    e.to_string(),
                    generation,
                ),
            );
            write_status(&sites_api, site, old_status.as_ref(), status).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if generated {
        let note = format!(
            "Generated the signing key {} of site {name} (Secret {}). Add {{kid: {}, key: {}}} to spec.publicKeys of GeoSite {name} in the manifests applied to the other clusters.",
            key.kid,
            key_secret_name(&name),
            key.kid,
            key.public_key
        );
        publish(
            ctx,
            site,
            EventType::Normal,
            "KeyGenerated",
            "GenerateKey",
            &note,
        )
        .await;
    }
    ctx.keys
        .write()
        .expect("key cache lock")
        .insert(super::key_of(site), signing);

    // Build. Never from a half-listed Replicable cache: a config without the replicables
    // would roll every pod twice at each operator start.
    ctx.replicables
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheNotReady)?;
    let replicables = all_replicables(ctx);
    let config = sidecar_config(site, &all, &replicables, &key, &ctx.defaults);
    let cm = configmap(site, &config);
    let sum = checksum(
        cm.data
            .as_ref()
            .and_then(|d| d.get(paths::CONFIG_KEY))
            .map(String::as_str)
            .unwrap_or_default(),
    );
    let sts = statefulset(site, &ctx.defaults, &sum);

    // Apply.
    apply::<ConfigMap>(ctx, &ns, &cm).await?;
    apply::<Service>(ctx, &ns, &headless_service(site)).await?;
    apply::<Service>(ctx, &ns, &client_service(site)).await?;
    let applied = apply::<StatefulSet>(ctx, &ns, &sts).await?;

    // Update status.
    let was_ready = old_status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Ready"))
        .is_some_and(Condition::is_true);
    let ready = workload_ready(site, &applied, generation);
    let now_ready = ready.is_true();
    set_condition(&mut status.conditions, ready);
    if let Some(p) = problems.iter().find(|p| p.reason == NO_PRIMARY) {
        set_condition(
            &mut status.conditions,
            Condition::new("Replicating", false, NO_PRIMARY, &p.message, generation),
        );
    } else if site.spec.role != SiteRole::Secondary {
        set_condition(
            &mut status.conditions,
            Condition::new(
                "Replicating",
                site.spec.role == SiteRole::Primary,
                if site.spec.role == SiteRole::Primary {
                    "Primary"
                } else {
                    "GeoDisabled"
                },
                if site.spec.role == SiteRole::Primary {
                    "the primary serves the Geo API; secondaries replicate from it"
                } else {
                    "Geo is disabled on this site"
                },
                generation,
            ),
        );
    } else if find(&status.conditions, "Replicating").is_none_or(|c| c.reason == NO_PRIMARY) {
        set_condition(
            &mut status.conditions,
            unknown(
                "Replicating",
                "AwaitingStatus",
                "no status read from the sidecars yet",
                generation,
            ),
        );
    }
    if find(&status.conditions, "Healthy").is_none() {
        set_condition(
            &mut status.conditions,
            unknown(
                "Healthy",
                "AwaitingStatus",
                "no status read from the sidecars yet",
                generation,
            ),
        );
    }
    status.public_keys = vec![PublicKey {
        kid: key.kid.clone(),
        key: key.public_key.clone(),
    }];
    status.observed_generation = generation;
    write_status(&sites_api, site, old_status.as_ref(), status).await?;
    if now_ready && !was_ready {
        publish(
            ctx,
            site,
            EventType::Normal,
            "SiteReady",
            "Reconcile",
            &format!(
                "all {} sidecar instance(s) of site {name} are ready",
                site.spec.replicas
            ),
        )
        .await;
    }
    Ok(Action::requeue(RESYNC))
}

/// `Ready` from the StatefulSet: every replica ready and on the current revision.
pub fn workload_ready(site: &GeoSite, sts: &StatefulSet, generation: Option<i64>) -> Condition {
    let want = site.spec.replicas;
    let st = sts.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let observed = st.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    if want == 0 {
        return Condition::new("Ready", false, "ScaledToZero", "replicas is 0", generation);
    }
    if observed && ready >= want && updated >= want {
        Condition::new(
            "Ready",
            true,
            "Available",
            format!("{ready}/{want} sidecar instances ready"),
            generation,
        )
    } else {
        Condition::new(
            "Ready",
            false,
            "Progressing",
            format!("{ready}/{want} sidecar instances ready, {updated} updated"),
            generation,
        )
    }
}

/// Server-side apply under the operator's field manager (forcing: the operator owns these fields).
async fn apply<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(conflict_aware(&name))
}

/// Writes `new` as the status when it differs from `old`, with the object's resourceVersion
/// for optimistic concurrency (a concurrent write gives 409 → [`Error::Conflict`] → retry).
pub async fn write_status(
    api: &Api<GeoSite>,
    site: &GeoSite,
    old: Option<&GeoSiteStatus>,
    new: GeoSiteStatus,
) -> Result<()> {
    if old == Some(&new) {
        return Ok(());
    }
    let mut patch = serde_json::json!({ "status": new });
    if let Some(rv) = &site.metadata.resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    api.patch_status(
        &site.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(conflict_aware(&site.name_any()))?;
    Ok(())
}

/// Reads the site's key Secret, creating it when absent. Never updates an existing one.
async fn ensure_key(
    ctx: &Context,
    site: &GeoSite,
    ns: &str,
) -> Result<(SigningKey, SiteKey, bool)> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = key_secret_name(&site.name_any());
    let read = |s: &Secret| {
        read_key_secret(s).map_err(|message| Error::KeySecret {
            secret: name.clone(),
            message,
        })
    };
    if let Some(existing) = api.get_opt(&name).await? {
        let (signing, key) = read(&existing)?;
        return Ok((signing, key, false));
    }
    let secret = key_secret(site, &generate_key());
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&pp, &secret).await {
        Ok(_) => {
            let (signing, key) = read(&secret)?;
            Ok((signing, key, true))
        }
        // Another replica (or a person) created it meanwhile: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&name).await?;
            let (signing, key) = read(&existing)?;
            Ok((signing, key, false))
        }
        Err(e) => Err(e.into()),
    }
}

/// Publishes an Event; a failure is logged, never fails the reconcile.
pub async fn publish(
    ctx: &Context,
    site: &GeoSite,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &site.object_ref(&())).await {
        tracing::warn!(site = %site.name_any(), reason, error = %e, "cannot publish event");
    }
}
