//! Status aggregation: every interval (30 s), read `GET /-/geo/status` from each pod of each
//! local site on its admin port, signing an `admin` token as that site, and write the counts
//! and conditions to the `Replicable`s and `GeoSite`s (merge patches on the status
//! subresource, only when something changed). A `geoforge.dev/confirm-deletes` annotation is
//! relayed to the sidecars that report the matching paused window.
//!
//! Per-site counts are the **worst instance's** view (each instance of a secondary is a full
//! replica with its own registry): the fewest synced/verified, the most failed/pending, the
//! smallest cursor, the largest lag. Summing instances would double-count.
//!
//! `POST /-/geo/confirm-deletes` body: `geoforge_crds::wire::ConfirmDeletes`
//! (`{"replicable": "<name>", "window_id": "<id>"}`), the type both sidecar roles parse.

use crate::build::{ADMIN_PORT, headless_service_name, statefulset_name};
use crate::controller::KeyCache;
use crate::controller::replicable::{UNKNOWN_SITE, unknown_sites};
use crate::metrics::Metrics;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use geoforge_crds::auth::{Scope, TokenData};
use geoforge_crds::condition::{Condition, find, set_condition};
use geoforge_crds::geosite::{GeoSiteStatus, SiteRole};
use geoforge_crds::replicable::{ReplicableStatus, ReplicationCounts, SiteReplication};
use geoforge_crds::wire::{DeletesPaused, StatusReport};
use geoforge_crds::{CONFIRM_DELETES_ANNOTATION, GeoSite, Replicable};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// A site is `Healthy` while its last status is younger than this.
pub const HEALTHY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);
/// `lastStatusTime` is rewritten at most this often when nothing else changed (bounded writes).
pub const STATUS_TIME_GRANULARITY: chrono::TimeDelta = chrono::TimeDelta::minutes(2);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a pod's admin port is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusUrls {
    /// `http://<sts>-<i>.<headless>.<ns>.svc:<admin>` (in the cluster).
    Cluster,
    /// Every pod at this base URL (tests serve the status from the host).
    Fixed(String),
}

impl StatusUrls {
    pub fn base(&self, site: &GeoSite, ordinal: i32) -> String {
        match self {
            StatusUrls::Fixed(u) => u.trim_end_matches('/').to_string(),
            StatusUrls::Cluster => {
                let name = site.name_any();
                format!(
                    "http://{}-{ordinal}.{}.{}.svc:{ADMIN_PORT}",
                    statefulset_name(&name),
                    headless_service_name(&name),
                    site.namespace().unwrap_or_default()
                )
            }
        }
    }
}

/// One pass's inputs and clients.
pub struct Aggregator {
    pub client: Client,
    pub sites: Store<GeoSite>,
    pub replicables: Store<Replicable>,
    pub local_sites: BTreeSet<String>,
    pub keys: KeyCache,
    pub metrics: Arc<Metrics>,
    pub urls: StatusUrls,
    pub recorder: Recorder,
}

/// Reports read in one pass, per site, with the base URL of the instance that sent each.
#[derive(Default, Debug)]
pub struct SiteReports {
    pub reports: Vec<(String, StatusReport)>,
    pub failures: usize,
    /// Not read this pass (its signing key is not loaded yet, e.g. just after a restart): the
    /// site's last known state is kept rather than reported as silent.
    pub skipped: bool,
}

/// Runs passes every `interval` until `shutdown`.
pub async fn run(
    agg: Aggregator,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    tokio::pin!(shutdown);
    // Start from complete caches, so a pass never sees sites without replicables or the reverse.
    tokio::select! {
        _ = &mut shutdown => return,
        r = async {
            agg.sites.wait_until_ready().await?;
            agg.replicables.wait_until_ready().await
        } => if r.is_err() { return; }
    }
    // The first pass waits one interval: the reconciler loads the sites' keys meanwhile.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                agg.pass(&http).await;
                agg.metrics.status_passes.inc();
            }
        }
    }
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

async fn request(
    http: &Http,
    method: http::Method,
    url: &str,
    auth: &str,
    body: Option<String>,
) -> Result<(http::StatusCode, Bytes), String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::AUTHORIZATION, auth);
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(FETCH_TIMEOUT, http.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = tokio::time::timeout(FETCH_TIMEOUT, resp.into_body().collect())
        .await
        .map_err(|_| "timed out reading the body".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

impl Aggregator {
    fn local_sites(&self) -> Vec<Arc<GeoSite>> {
        self.sites
            .state()
            .into_iter()
            .filter(|s| self.local_sites.contains(&s.name_any()))
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Reads every instance of `site`.
    pub async fn read_site(&self, http: &Http, site: &GeoSite) -> SiteReports {
        let mut out = SiteReports::default();
        let key = self
            .keys
            .read()
            .expect("key cache lock")
            .get(&crate::controller::key_of(site))
            .cloned();
        let Some(key) = key else {
            // The GeoSite reconciler has not loaded the key yet.
            out.skipped = true;
            return out;
        };
        let name = site.name_any();
        for i in 0..site.spec.replicas.max(0) {
            let base = self.urls.base(site, i);
            let auth = key.authorization(&name, &TokenData::scope(Scope::Admin));
            let url = format!("{base}/-/geo/status");
            match request(http, http::Method::GET, &url, &auth, None).await {
                Ok((s, body)) if s.is_success() => {
                    match serde_json::from_slice::<StatusReport>(&body) {
                        Ok(r) => out.reports.push((base, r)),
                        Err(e) => {
                            tracing::warn!(site = %name, %url, error = %e, "unparseable status");
                            out.failures += 1;
                        }
                    }
                }
                Ok((s, _)) => {
                    tracing::warn!(site = %name, %url, status = %s, "status read refused");
                    out.failures += 1;
                }
                Err(e) => {
                    tracing::debug!(site = %name, %url, error = %e, "status read failed");
                    out.failures += 1;
                }
            }
        }
        self.metrics.status_fetch_errors.inc_by(out.failures as u64);
        out
    }

    /// One pass over every local site and every replicable.
    pub async fn pass(&self, http: &Http) {
        let now = Utc::now();
        let sites = self.local_sites();
        let mut by_site: BTreeMap<String, SiteReports> = BTreeMap::new();
        for site in &sites {
            by_site.insert(site.name_any(), self.read_site(http, site).await);
        }
        let all_names: Vec<String> = self.sites.state().iter().map(|s| s.name_any()).collect();
        let secondaries: Vec<String> = sites
            .iter()
            .filter(|s| s.spec.role == SiteRole::Secondary)
            .map(|s| s.name_any())
            .collect();
        for rep in self.replicables.state() {
            let status = replicable_status(&rep, &secondaries, &by_site, &all_names, now);
            let reason = |s: Option<&ReplicableStatus>| {
                s.and_then(|s| find(&s.conditions, "Synced"))
                    .map(|c| c.reason.clone())
            };
            if reason(Some(&status)).as_deref() == Some("DeletesPaused")
                && reason(rep.status.as_ref()).as_deref() != Some("DeletesPaused")
            {
                let note = find(&status.conditions, "Synced")
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                let ev = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Warning,
                    reason: "DeletesPaused".into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: "Replicate".into(),
                    secondary: None,
                };
                if let Err(e) = self
                    .recorder
                    .publish(&ev, &kube::Resource::object_ref(rep.as_ref(), &()))
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish event");
                }
            }
            if rep.status.as_ref() != Some(&status)
                && let Err(e) = self.patch_replicable(&rep, &status).await
            {
                tracing::warn!(replicable = %rep.name_any(), error = %e, "cannot write status");
            }
            self.relay_confirm(http, &rep, &sites, &by_site).await;
        }
        for site in &sites {
            let reports = by_site.get(&site.name_any());
            let status = site_status(site, reports, now);
            if site.status.as_ref() != Some(&status)
                && let Err(e) = self.patch_site(site, &status).await
            {
                tracing::warn!(site = %site.name_any(), error = %e, "cannot write status");
            }
        }
    }

    async fn patch_replicable(
        &self,
        rep: &Replicable,
        status: &ReplicableStatus,
    ) -> Result<(), kube::Error> {
        let api: Api<Replicable> =
            Api::namespaced(self.client.clone(), &rep.namespace().unwrap_or_default());
        // With the resourceVersion read: a concurrent writer (the Replicable controller) makes
        // this a 409, and the next pass retries from fresh data instead of undoing its write.
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
        .map(|_| ())
    }

    async fn patch_site(&self, site: &GeoSite, status: &GeoSiteStatus) -> Result<(), kube::Error> {
        let api: Api<GeoSite> =
            Api::namespaced(self.client.clone(), &site.namespace().unwrap_or_default());
        // Only the fields the aggregation owns; the reconciler writes the rest.
        // The conditions list is replaced whole: send the resourceVersion read, so a concurrent
        // reconciler write (e.g. Ready) gives a 409 instead of being undone.
        let mut patch = serde_json::json!({ "status": {
            "conditions": status.conditions,
            "lastStatusTime": status.last_status_time,
        }});
        if let Some(rv) = &site.metadata.resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        api.patch_status(
            &site.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
    }

    /// Relays `geoforge.dev/confirm-deletes=<window id>` to every instance reporting that window.
    async fn relay_confirm(
        &self,
        http: &Http,
        rep: &Replicable,
        sites: &[Arc<GeoSite>],
        by_site: &BTreeMap<String, SiteReports>,
    ) {
        let Some(window) = rep.annotations().get(CONFIRM_DELETES_ANNOTATION) else {
            return;
        };
        for site in sites {
            let name = site.name_any();
            let Some(reports) = by_site.get(&name) else {
                continue;
            };
            let key = self
                .keys
                .read()
                .expect("key cache lock")
                .get(&crate::controller::key_of(site.as_ref()))
                .cloned();
            let Some(key) = key else { continue };
            for base in confirm_targets(rep, window, reports) {
                let body = serde_json::to_value(geoforge_crds::wire::ConfirmDeletes {
                    replicable: Some(rep.name_any()),
                    window_id: Some(window.to_string()),
                })
                .expect("serializable");
                let auth = key.authorization(&name, &TokenData::scope(Scope::Admin));
                let url = format!("{base}/-/geo/confirm-deletes");
                match request(
                    http,
                    http::Method::POST,
                    &url,
                    &auth,
                    Some(body.to_string()),
                )
                .await
                {
                    Ok((s, _)) if s.is_success() => {
                        tracing::info!(replicable = %rep.name_any(), site = %name, window, "relayed delete confirmation")
                    }
                    Ok((s, _)) => tracing::warn!(%url, status = %s, "delete confirmation refused"),
                    Err(e) => tracing::warn!(%url, error = %e, "delete confirmation failed"),
                }
            }
        }
    }
}

/// Base URLs of the instances whose report shows `window` paused for `rep`.
pub fn confirm_targets(rep: &Replicable, window: &str, reports: &SiteReports) -> Vec<String> {
    let name = rep.name_any();
    reports
        .reports
        .iter()
        .filter(|(_, r)| {
            r.replicables.iter().any(|x| {
                x.replicable == name
                    && x.deletes_paused
                        .as_ref()
                        .is_some_and(|d| d.window_id == window)
            })
        })
        .map(|(base, _)| base.clone())
        .collect()
}

/// The worst instance's view of one replicable on one site, and a paused delete if any.
pub fn site_replication(
    site: &str,
    rep: &str,
    reports: &[(String, StatusReport)],
) -> Option<(SiteReplication, Option<DeletesPaused>)> {
    let mut out: Option<SiteReplication> = None;
    let mut paused = None;
    for (_, r) in reports {
        let Some(x) = r.replicables.iter().find(|x| x.replicable == rep) else {
            continue;
        };
        if paused.is_none() {
            paused = x.deletes_paused.clone();
        }
        let this = SiteReplication {
            site: site.to_string(),
            counts: ReplicationCounts {
                total: x.total,
                synced: x.synced,
                failed: x.failed,
                pending: x.pending + x.started,
                verified: x.verified,
                verification_failed: x.verification_failed,
            },
            last_event_id: r.cursor,
            lag_seconds: r.lag_seconds,
        };
        out = Some(match out {
            None => this,
            Some(o) => SiteReplication {
                site: site.to_string(),
                counts: ReplicationCounts {
                    total: o.counts.total.max(this.counts.total),
                    synced: o.counts.synced.min(this.counts.synced),
                    failed: o.counts.failed.max(this.counts.failed),
                    pending: o.counts.pending.max(this.counts.pending),
                    verified: o.counts.verified.min(this.counts.verified),
                    verification_failed: o
                        .counts
                        .verification_failed
                        .max(this.counts.verification_failed),
                },
                last_event_id: o.last_event_id.min(this.last_event_id),
                lag_seconds: o.lag_seconds.max(this.lag_seconds),
            },
        });
    }
    out.map(|o| (o, paused))
}

fn cond(
    type_: &str,
    status: Option<bool>,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let mut c = Condition::new(type_, status.unwrap_or(false), reason, message, generation);
    if status.is_none() {
        c.status = "Unknown".into();
    }
    c
}

/// The status of a replicable from this pass's reports (pure). `secondaries` are the local
/// secondary sites; `all_sites` every site name of the scope.
pub fn replicable_status(
    rep: &Replicable,
    secondaries: &[String],
    by_site: &BTreeMap<String, SiteReports>,
    all_sites: &[String],
    now: DateTime<Utc>,
) -> ReplicableStatus {
    let name = rep.name_any();
    let generation = rep.metadata.generation;
    let mut status = rep.status.clone().unwrap_or_default();
    let applicable: Vec<&String> = secondaries
        .iter()
        .filter(|s| rep.spec.applies_to(s))
        .collect();
    let mut sites = vec![];
    let mut paused: Vec<(String, DeletesPaused)> = vec![];
    let mut missing = vec![];
    let mut skipped = false;
    for s in &applicable {
        let site_reports = by_site.get(*s);
        if site_reports.is_some_and(|r| r.skipped) {
            if let Some(old) = status.sites.iter().find(|x| &x.site == *s) {
                sites.push(old.clone());
            }
            skipped = true;
            continue;
        }
        let reports = site_reports.map(|r| r.reports.as_slice()).unwrap_or(&[]);
        match site_replication(s, &name, reports) {
            Some((sr, p)) => {
                if let Some(p) = p {
                    paused.push((s.to_string(), p));
                }
                sites.push(sr);
            }
            None => {
                // Keep the last known counts of a site that did not answer this time.
                if let Some(old) = status.sites.iter().find(|x| &x.site == *s) {
                    sites.push(old.clone());
                }
                missing.push(s.to_string());
            }
        }
    }
    sites.sort_by(|a, b| a.site.cmp(&b.site));
    let mut sum = ReplicationCounts::default();
    for s in &sites {
        sum.total += s.counts.total;
        sum.synced += s.counts.synced;
        sum.failed += s.counts.failed;
        sum.pending += s.counts.pending;
        sum.verified += s.counts.verified;
        sum.verification_failed += s.counts.verification_failed;
    }
    let reported = !sites.is_empty();
    // Synced
    let synced = if let Some((site, p)) = paused.first() {
        cond(
            "Synced",
            Some(false),
            "DeletesPaused",
            format!(
                "{site}: {} (confirm with: kubectl annotate replicable {name} {CONFIRM_DELETES_ANNOTATION}={} --overwrite)",
                p.message, p.window_id
            ),
            generation,
        )
    } else if !reported {
        cond(
            "Synced",
            None,
            "NoStatus",
            "no sidecar has reported this replicable yet".into(),
            generation,
        )
    } else if sum.failed > 0 {
        cond(
            "Synced",
            Some(false),
            "ItemsFailed",
            format!(
                "{} item(s) failed to sync, {} pending",
                sum.failed, sum.pending
            ),
            generation,
        )
    } else if sum.pending > 0 {
        cond(
            "Synced",
            Some(false),
            "ItemsPending",
            format!("{} item(s) pending", sum.pending),
            generation,
        )
    } else {
        cond(
            "Synced",
            Some(true),
            "AllSynced",
            format!("{} item(s) synced on {} site(s)", sum.synced, sites.len()),
            generation,
        )
    };
    set_condition(&mut status.conditions, synced);
    let verified = if !reported {
        cond(
            "Verified",
            None,
            "NoStatus",
            "no sidecar has reported this replicable yet".into(),
            generation,
        )
    } else if sum.verification_failed > 0 {
        cond(
            "Verified",
            Some(false),
            "VerificationFailed",
            format!("{} item(s) failed verification", sum.verification_failed),
            generation,
        )
    } else if sum.verified < sum.synced {
        cond(
            "Verified",
            Some(false),
            "VerificationPending",
            format!("{}/{} synced item(s) verified", sum.verified, sum.synced),
            generation,
        )
    } else {
        cond(
            "Verified",
            Some(true),
            "AllVerified",
            format!("{} item(s) verified", sum.verified),
            generation,
        )
    };
    set_condition(&mut status.conditions, verified);
    let unknown = unknown_sites(rep, all_sites);
    let ready = if !unknown.is_empty() {
        cond(
            "Ready",
            Some(false),
            UNKNOWN_SITE,
            format!(
                "spec.sites names {} but no GeoSite by that name exists",
                unknown.join(", ")
            ),
            generation,
        )
    } else if applicable.is_empty() {
        cond(
            "Ready",
            None,
            "NoLocalSecondary",
            "no local secondary site replicates this".into(),
            generation,
        )
    } else if !missing.is_empty() {
        cond(
            "Ready",
            Some(false),
            "SiteNotReporting",
            format!("no status from {}", missing.join(", ")),
            generation,
        )
    } else {
        cond(
            "Ready",
            Some(true),
            "Reporting",
            format!("{} site(s) reporting", sites.len()),
            generation,
        )
    };
    // A skipped site says nothing new: keep the last Ready rather than flip it.
    if !skipped || find(&status.conditions, "Ready").is_none() {
        set_condition(&mut status.conditions, ready);
    }
    let _ = now;
    status.sites = sites;
    status.summary = Some(sum);
    status
}

/// `Healthy`, `Replicating` and `lastStatusTime` of a local site from this pass (pure).
pub fn site_status(
    site: &GeoSite,
    reports: Option<&SiteReports>,
    now: DateTime<Utc>,
) -> GeoSiteStatus {
    let generation = site.metadata.generation;
    let mut status = site.status.clone().unwrap_or_default();
    let empty = SiteReports::default();
    let reports = reports.unwrap_or(&empty);
    let newest = reports
        .reports
        .iter()
        .map(|(_, r)| r.reported_at.min(now))
        .max();
    if let Some(t) = newest {
        let stale = status
            .last_status_time
            .is_none_or(|old| t - old >= STATUS_TIME_GRANULARITY || old > t);
        if stale {
            status.last_status_time = Some(t);
        }
    }
    let last = newest.or(status.last_status_time);
    let healthy = match last {
        Some(t) if now - t < HEALTHY_WINDOW => cond(
            "Healthy",
            Some(true),
            "StatusRecent",
            format!(
                "{}/{} instance(s) reported",
                reports.reports.len(),
                site.spec.replicas
            ),
            generation,
        ),
        Some(t) => cond(
            "Healthy",
            Some(false),
            "StatusStale",
            format!(
                "last status at {}, more than 10 minutes ago",
                t.to_rfc3339()
            ),
            generation,
        ),
        None => cond(
            "Healthy",
            None,
            "AwaitingStatus",
            "no status read from the sidecars yet".into(),
            generation,
        ),
    };
    set_condition(&mut status.conditions, healthy);
    if site.spec.role == SiteRole::Secondary && !reports.reports.is_empty() {
        let paused: Vec<String> = reports
            .reports
            .iter()
            .filter_map(|(_, r)| r.paused.as_ref().map(|p| format!("{}: {p}", r.instance)))
            .collect();
        let keep_no_primary = find(&status.conditions, "Replicating")
            .is_some_and(|c| c.reason == crate::controller::validate::NO_PRIMARY);
        let replicating = if !paused.is_empty() {
            cond(
                "Replicating",
                Some(false),
                "Paused",
                paused.join("; "),
                generation,
            )
        } else if keep_no_primary {
            find(&status.conditions, "Replicating")
                .cloned()
                .expect("checked")
        } else {
            let lag = reports
                .reports
                .iter()
                .map(|(_, r)| r.lag_seconds)
                .max()
                .unwrap_or(0);
            cond(
                "Replicating",
                Some(true),
                "Replicating",
                format!("replication lag {lag}s"),
                generation,
            )
        };
        set_condition(&mut status.conditions, replicating);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;
    use geoforge_crds::wire::ReplicableReport;

    fn report(
        instance: &str,
        synced: i64,
        failed: i64,
        pending: i64,
        paused: Option<&str>,
    ) -> StatusReport {
        StatusReport {
            site: "tokyo".into(),
            instance: instance.into(),
            role: "secondary".into(),
            version: "0.1.0".into(),
            geo_api_version: "1.0".into(),
            cursor: 40 + synced,
            last_event_id: 50,
            lag_seconds: failed,
            replicables: vec![ReplicableReport {
                replicable: "repositories".into(),
                total: 10,
                synced,
                failed,
                pending,
                verified: synced,
                deletes_paused: paused.map(|w| DeletesPaused {
                    window_id: w.into(),
                    count: 70,
                    message: "70 deletes in 10 minutes".into(),
                }),
                ..ReplicableReport::default()
            }],
            reported_at: Utc::now(),
            ..StatusReport::default()
        }
    }

    fn by_site(reports: Vec<StatusReport>) -> BTreeMap<String, SiteReports> {
        BTreeMap::from([(
            "tokyo".to_string(),
            SiteReports {
                reports: reports
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (format!("http://pod-{i}"), r))
                    .collect(),
                failures: 0,
                skipped: false,
            },
        )])
    }

    fn names() -> Vec<String> {
        vec!["paris".into(), "tokyo".into(), "london".into()]
    }

    #[test]
    fn all_synced_is_synced_true_with_worst_instance_counts() {
        let rep = &replicables()[0];
        let s = replicable_status(
            rep,
            &["tokyo".into()],
            &by_site(vec![
                report("tokyo-geo-0", 10, 0, 0, None),
                report("tokyo-geo-1", 10, 0, 0, None),
            ]),
            &names(),
            Utc::now(),
        );
        assert_eq!(s.sites.len(), 1);
        assert_eq!(s.summary.unwrap().synced, 10);
        assert!(find(&s.conditions, "Synced").unwrap().is_true());
        assert!(find(&s.conditions, "Verified").unwrap().is_true());
        assert!(find(&s.conditions, "Ready").unwrap().is_true());

        let s = replicable_status(
            rep,
            &["tokyo".into()],
            &by_site(vec![
                report("tokyo-geo-0", 10, 0, 0, None),
                report("tokyo-geo-1", 7, 1, 2, None),
            ]),
            &names(),
            Utc::now(),
        );
        let site = &s.sites[0];
        assert_eq!(
            (site.counts.synced, site.counts.failed, site.counts.pending),
            (7, 1, 2)
        );
        assert_eq!(site.last_event_id, 47);
        let synced = find(&s.conditions, "Synced").unwrap();
        assert_eq!(
            (synced.status.as_str(), synced.reason.as_str()),
            ("False", "ItemsFailed")
        );
    }

    #[test]
    fn paused_deletes_show_as_deletes_paused_and_are_relayed() {
        let rep = &replicables()[0];
        let sites = by_site(vec![report("tokyo-geo-0", 10, 0, 0, Some("w-42"))]);
        let s = replicable_status(rep, &["tokyo".into()], &sites, &names(), Utc::now());
        let synced = find(&s.conditions, "Synced").unwrap();
        assert_eq!(synced.reason, "DeletesPaused");
        assert!(
            synced.message.contains("confirm-deletes=w-42"),
            "{}",
            synced.message
        );
        assert_eq!(
            confirm_targets(rep, "w-42", &sites["tokyo"]),
            ["http://pod-0"]
        );
        assert!(confirm_targets(rep, "w-other", &sites["tokyo"]).is_empty());
    }

    #[test]
    fn no_reports_is_unknown_and_keeps_old_counts() {
        let mut rep = replicables()[0].clone();
        let first = replicable_status(
            &rep,
            &["tokyo".into()],
            &by_site(vec![report("a", 5, 0, 5, None)]),
            &names(),
            Utc::now(),
        );
        rep.status = Some(first);
        let s = replicable_status(
            &rep,
            &["tokyo".into()],
            &BTreeMap::new(),
            &names(),
            Utc::now(),
        );
        assert_eq!(s.sites[0].counts.synced, 5, "last known counts kept");
        let ready = find(&s.conditions, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "SiteNotReporting")
        );
    }

    #[test]
    fn a_skipped_site_keeps_its_last_state() {
        let mut rep = replicables()[0].clone();
        let first = replicable_status(
            &rep,
            &["tokyo".into()],
            &by_site(vec![report("a", 5, 0, 0, None)]),
            &names(),
            Utc::now(),
        );
        rep.status = Some(first.clone());
        let skipped = BTreeMap::from([(
            "tokyo".to_string(),
            SiteReports {
                skipped: true,
                ..SiteReports::default()
            },
        )]);
        let s = replicable_status(&rep, &["tokyo".into()], &skipped, &names(), Utc::now());
        assert_eq!(s, first, "nothing changes while the key is not loaded");
    }

    #[test]
    fn site_health_and_replicating() {
        let now = Utc::now();
        let t = tokyo();
        let sites = by_site(vec![report("tokyo-geo-0", 1, 0, 0, None)]);
        let s = site_status(&t, sites.get("tokyo"), now);
        assert!(find(&s.conditions, "Healthy").unwrap().is_true());
        assert!(find(&s.conditions, "Replicating").unwrap().is_true());
        assert!(s.last_status_time.is_some());
        // Eleven minutes later without a report: stale.
        let mut later = t.clone();
        later.status = Some(s);
        let s2 = site_status(&later, None, now + chrono::TimeDelta::minutes(11));
        let h = find(&s2.conditions, "Healthy").unwrap();
        assert_eq!(
            (h.status.as_str(), h.reason.as_str()),
            ("False", "StatusStale")
        );
        // A paused instance.
        let mut r = report("tokyo-geo-0", 1, 0, 0, None);
        r.paused = Some("primary unknown".into());
        let s3 = site_status(&t, by_site(vec![r]).get("tokyo"), now);
        let rep = find(&s3.conditions, "Replicating").unwrap();
        assert_eq!(
            (rep.status.as_str(), rep.reason.as_str()),
            ("False", "Paused")
        );
        assert!(rep.message.contains("primary unknown"));
    }

    #[test]
    fn status_time_is_written_coarsely() {
        let now = Utc::now();
        let mut t = tokyo();
        let s = site_status(
            &t,
            by_site(vec![report("a", 1, 0, 0, None)]).get("tokyo"),
            now,
        );
        t.status = Some(s.clone());
        let mut r = report("a", 1, 0, 0, None);
        r.reported_at = now + chrono::TimeDelta::seconds(30);
        let s2 = site_status(
            &t,
            by_site(vec![r]).get("tokyo"),
            now + chrono::TimeDelta::seconds(30),
        );
        assert_eq!(s, s2, "nothing to write 30 s later");
    }

    #[test]
    fn cluster_urls_name_the_pod() {
        assert_eq!(
            StatusUrls::Cluster.base(&tokyo(), 1),
            "http://tokyo-geo-1.tokyo-geo-headless.geo.svc:8081"
        );
        assert_eq!(
            StatusUrls::Fixed("http://127.0.0.1:9/".into()).base(&tokyo(), 1),
            "http://127.0.0.1:9"
        );
    }

    /// A whole pass against a fake sidecar (served here) and a mocked API server: the admin
    /// token is the site's own, the report lands in the statuses, the confirmation is relayed.
    #[tokio::test]
    async fn pass_reads_the_sidecar_writes_status_and_relays_confirmation() {
        use axum::routing::{get, post};
        use geoforge_crds::auth::{KeyRing, SigningKey, generate_key};
        use http::{Request, Response};
        use kube::client::Body;
        use kube::runtime::{reflector, watcher};
        use std::sync::Mutex;

        let g = generate_key();
        let key = SigningKey::from_pem("tokyo.1", &g.private_pem).unwrap();
        let mut ring = KeyRing::new(Duration::from_secs(60));
        ring.add_ed25519("tokyo.1", "tokyo", &g.public_key).unwrap();
        let ring = Arc::new(ring);
        let confirmed: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();

        // The fake sidecar's admin port.
        let r1 = ring.clone();
        let r2 = ring.clone();
        let c2 = confirmed.clone();
        let app = axum::Router::new()
            .route(
                "/-/geo/status",
                get(move |h: axum::http::HeaderMap| async move {
                    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                    match r1.verify_authorization(auth, "tokyo", Scope::Admin) {
                        Ok(_) => axum::Json(report("tokyo-geo-0", 10, 0, 0, Some("w-1"))).into_response(),
                        Err(e) => (http::StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
                    }
                }),
            )
            .route(
                "/-/geo/confirm-deletes",
                post(move |h: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| async move {
                    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                    if r2.verify_authorization(auth, "tokyo", Scope::Admin).is_err() {
                        return http::StatusCode::UNAUTHORIZED;
                    }
                    c2.lock().unwrap().push(body.0);
                    http::StatusCode::NO_CONTENT
                }),
            );
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        // The mocked API server.
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let mut site = tokyo();
        site.spec.replicas = 1;
        site.metadata.resource_version = Some("9".into());
        let (sites, mut sw) = reflector::store();
        sw.apply_watcher_event(&watcher::Event::Apply(site.clone()));
        sw.apply_watcher_event(&watcher::Event::Apply(paris()));
        let mut rep = replicables()[0].clone();
        rep.metadata.annotations =
            Some([(CONFIRM_DELETES_ANNOTATION.to_string(), "w-1".to_string())].into());
        let (reps, mut rw) = reflector::store();
        rw.apply_watcher_event(&watcher::Event::Apply(rep.clone()));
        let keys: KeyCache = Arc::default();
        keys.write().unwrap().insert("geo/tokyo".into(), key);
        let agg = Aggregator {
            client: client.clone(),
            sites,
            replicables: reps,
            local_sites: ["tokyo".to_string()].into(),
            keys,
            metrics: Arc::new(Metrics::default()),
            urls: StatusUrls::Fixed(format!("http://{addr}")),
            recorder: Recorder::new(client, "test".into()),
        };
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            while let Some((req, send)) = handle.next_request().await {
                let line = format!("{} {}", req.method(), req.uri().path());
                let body = req.into_body().collect_bytes().await.unwrap();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                seen.push((line, v.clone()));
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&v).unwrap()))
                        .unwrap(),
                );
            }
            seen
        });
        let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        agg.pass(&http).await;
        assert_eq!(agg.metrics.status_fetch_errors.get(), 0);
        drop(agg);
        let seen = server.await.unwrap();
        let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            lines,
            [
                "POST /apis/events.k8s.io/v1/namespaces/geo/events",
                "PATCH /apis/geoforge.dev/v1alpha1/namespaces/geo/replicables/repositories/status",
                "PATCH /apis/geoforge.dev/v1alpha1/namespaces/geo/geosites/tokyo/status",
            ]
        );
        assert_eq!(seen[0].1["reason"], "DeletesPaused");
        let rs: ReplicableStatus = serde_json::from_value(seen[1].1["status"].clone()).unwrap();
        assert_eq!(rs.sites[0].site, "tokyo");
        assert_eq!(rs.summary.unwrap().synced, 10);
        assert_eq!(
            find(&rs.conditions, "Synced").unwrap().reason,
            "DeletesPaused"
        );
        assert_eq!(
            seen[2].1["metadata"]["resourceVersion"], "9",
            "optimistic concurrency"
        );
        let gs = &seen[2].1["status"];
        assert!(gs["lastStatusTime"].is_string());
        let healthy: Vec<_> = gs["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["type"] == "Healthy")
            .collect();
        assert_eq!(healthy[0]["status"], "True");
        let confirmed = confirmed.lock().unwrap().clone();
        assert_eq!(
            confirmed,
            [serde_json::json!({"replicable": "repositories", "window_id": "w-1"})]
        );
    }
}
