//! The `Replicable` controller: checks the sites a replicable names and records the observed
//! generation. Counts and the `Synced`/`Verified`/`Ready` conditions come from the status
//! aggregation ([`crate::status`]); config changes reach the sidecars through the `GeoSite`
//! controller, which watches `Replicable`s.

use super::Backoff;
use crate::error::{Error, Result, conflict_aware};
use crate::metrics::Metrics;
use geoforge_crds::condition::{Condition, find, set_condition};
use geoforge_crds::replicable::ReplicableStatus;
use geoforge_crds::{GeoSite, Replicable};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use std::sync::Arc;

pub const CONTROLLER: &str = "replicable";
pub const UNKNOWN_SITE: &str = "UnknownSite";

pub struct RepContext {
    pub client: Client,
    pub sites: Store<GeoSite>,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
}

/// Names in `spec.sites` that are no `GeoSite` of the scope.
pub fn unknown_sites(rep: &Replicable, sites: &[String]) -> Vec<String> {
    rep.spec
        .sites
        .iter()
        .filter(|s| !sites.contains(s))
        .cloned()
        .collect()
}

/// The status the controller wants (pure): observed generation and, for a replicable that
/// names unknown sites, `Ready=False` reason `UnknownSite`.
pub fn desired_status(rep: &Replicable, site_names: &[String]) -> ReplicableStatus {
    let mut status = rep.status.clone().unwrap_or_default();
    let generation = rep.metadata.generation;
    let unknown = unknown_sites(rep, site_names);
    if !unknown.is_empty() {
        set_condition(
            &mut status.conditions,
            Condition::new(
                "Ready",
                false,
                UNKNOWN_SITE,
                format!(
                    "spec.sites names {} but no GeoSite by that name exists: create it (the same manifests in every cluster) or fix the name",
                    unknown.join(", ")
                ),
                generation,
            ),
        );
    } else if find(&status.conditions, "Ready").is_some_and(|c| c.reason == UNKNOWN_SITE) {
        set_condition(
            &mut status.conditions,
            Condition {
                status: "Unknown".into(),
                ..Condition::new(
                    "Ready",
                    false,
                    "AwaitingStatus",
                    "waiting for the sidecars' status",
                    generation,
                )
            },
        );
    }
    status.observed_generation = generation;
    status
}

pub async fn reconcile(rep: Arc<Replicable>, ctx: Arc<RepContext>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let ns = rep.namespace().ok_or(Error::MissingNamespace)?;
    let names: Vec<String> = ctx.sites.state().iter().map(|s| s.name_any()).collect();
    let status = desired_status(&rep, &names);
    if rep.status.as_ref() != Some(&status) {
        let api: Api<Replicable> = Api::namespaced(ctx.client.clone(), &ns);
        let mut patch = serde_json::json!({ "status": status });
        if let Some(rv) = &rep.metadata.resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        api.patch_status(
            &rep.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(conflict_aware(&rep.name_any()))?;
    }
    ctx.backoff.reset(&super::key_of(rep.as_ref()));
    if !unknown_sites(&rep, &names).is_empty() {
        // The site may be created later; look again without a hot loop.
        return Ok(Action::requeue(std::time::Duration::from_secs(300)));
    }
    Ok(Action::await_change())
}

pub fn error_policy(rep: Arc<Replicable>, error: &Error, ctx: Arc<RepContext>) -> Action {
    tracing::warn!(replicable = %rep.name_any(), %error, "reconcile failed");
    ctx.metrics.error(CONTROLLER, error.metric_label());
    Action::requeue(
        ctx.backoff
            .next(&super::key_of(rep.as_ref()), error.is_transient()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::replicables;

    #[test]
    fn unknown_site_sets_ready_false_and_clears() {
        let reps = replicables();
        let lfs = &reps[1]; // names london
        let s = desired_status(lfs, &["paris".into(), "tokyo".into()]);
        let ready = find(&s.conditions, "Ready").unwrap();
        assert_eq!(ready.reason, UNKNOWN_SITE);
        assert!(ready.message.contains("london"));
        assert_eq!(s.observed_generation, Some(1));
        let mut fixed = lfs.clone();
        fixed.status = Some(s);
        let s2 = desired_status(&fixed, &["london".into()]);
        assert_eq!(find(&s2.conditions, "Ready").unwrap().status, "Unknown");
        // Nothing to say about a replicable for every secondary.
        assert!(desired_status(&reps[0], &[]).conditions.is_empty());
    }
}
