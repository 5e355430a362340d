//! `kubectl geo status`: what the operator wrote into `GeoSite` and `Replicable` status,
//! as two tables (sites; replicables × sites) and the conditions that are not `True`.

use crate::{human_seconds, table};
use chrono::{DateTime, Utc};
use geoforge_crds::geosite::SiteRole;
use geoforge_crds::replicable::SiteReplication;
use geoforge_crds::{Condition, GeoSite, Replicable};
use kube::ResourceExt;

/// The sites a replicable is expected on: its `spec.sites`, or every secondary when empty,
/// plus every site that reported for it (a report from a site outside the list still shows).
pub fn expected_sites(rep: &Replicable, sites: &[GeoSite]) -> Vec<String> {
    let mut names: Vec<String> = if rep.spec.sites.is_empty() {
        sites
            .iter()
            .filter(|s| s.spec.role == SiteRole::Secondary)
            .map(|s| s.name_any())
            .collect()
    } else {
        rep.spec.sites.clone()
    };
    if let Some(st) = &rep.status {
        for r in &st.sites {
            if !names.contains(&r.site) {
                names.push(r.site.clone());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// This site's report in a replicable's status, if any.
pub fn report<'a>(rep: &'a Replicable, site: &str) -> Option<&'a SiteReplication> {
    rep.status.as_ref()?.sites.iter().find(|r| r.site == site)
}

fn cond_status(conditions: &[Condition], type_: &str) -> String {
    geoforge_crds::condition::find(conditions, type_)
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "-".into())
}

fn conditions_summary(conditions: &[Condition], types: &[&str]) -> String {
    types
        .iter()
        .map(|t| format!("{t}={}", cond_status(conditions, t)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders the status report. `now` is passed in so the output is reproducible in tests.
pub fn render(sites: &[GeoSite], reps: &[Replicable], now: DateTime<Utc>) -> String {
    let mut sites: Vec<&GeoSite> = sites.iter().collect();
    sites.sort_by_key(|s| (role_rank(s.spec.role), s.name_any()));
    let mut reps: Vec<&Replicable> = reps.iter().collect();
    reps.sort_by_key(|r| (r.namespace().unwrap_or_default(), r.name_any()));

    let mut out = String::new();
    if sites.is_empty() {
        out.push_str("No GeoSites found.\n");
    } else {
        let rows: Vec<Vec<String>> = sites
            .iter()
            .map(|s| {
                let st = s.status.clone().unwrap_or_default();
                let keys = if st.public_keys.is_empty() {
                    "-".to_string()
                } else {
                    st.public_keys
                        .iter()
                        .map(|k| k.kid.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                vec![
                    s.name_any(),
                    s.namespace().unwrap_or_default(),
                    s.spec.role.as_str().to_string(),
                    s.spec.replicas.to_string(),
                    cond_status(&st.conditions, "Ready"),
                    cond_status(&st.conditions, "Replicating"),
                    cond_status(&st.conditions, "Healthy"),
                    keys,
                    st.last_status_time
                        .map(|t| format!("{} ago", human_seconds((now - t).num_seconds())))
                        .unwrap_or_else(|| "never".into()),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                "SITE",
                "NAMESPACE",
                "ROLE",
                "REPLICAS",
                "READY",
                "REPLICATING",
                "HEALTHY",
                "KEYS",
                "LAST STATUS",
            ],
            &rows,
        ));
    }
    out.push('\n');

    if reps.is_empty() {
        out.push_str("No Replicables found.\n");
        return out;
    }
    let all_sites: Vec<GeoSite> = sites.iter().map(|s| (*s).clone()).collect();
    let mut rows = Vec::new();
    for rep in &reps {
        let conditions = rep
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let conds = conditions_summary(conditions, &["Synced", "Verified", "Ready"]);
        let expected = expected_sites(rep, &all_sites);
        if expected.is_empty() {
            rows.push(vec![
                rep.name_any(),
                rep.namespace().unwrap_or_default(),
                rep.spec.data_type.as_str().into(),
                "(no secondary)".into(),
            ]);
        }
        for site in expected {
            let mut row = vec![
                rep.name_any(),
                rep.namespace().unwrap_or_default(),
                rep.spec.data_type.as_str().into(),
                site.clone(),
            ];
            match report(rep, &site) {
                Some(r) => {
                    let c = r.counts;
                    row.extend([
                        c.total.to_string(),
                        c.synced.to_string(),
                        c.pending.to_string(),
                        c.failed.to_string(),
                        format!("{}/{}", c.verified, c.verification_failed),
                        human_seconds(r.lag_seconds),
                        r.last_event_id.to_string(),
                    ]);
                }
                None => row.extend(["-", "-", "-", "-", "-", "-", "-"].map(String::from)),
            }
            row.push(conds.clone());
            rows.push(row);
        }
    }
    out.push_str(&table::render(
        &[
            "REPLICABLE",
            "NAMESPACE",
            "TYPE",
            "SITE",
            "TOTAL",
            "SYNCED",
            "PENDING",
            "FAILED",
            "VERIFIED/FAILED",
            "LAG",
            "EVENT",
            "CONDITIONS",
        ],
        &rows,
    ));

    // Conditions that are False, with their reason and message: what to look at first
    // (Unknown is left out: a peer site of another cluster is Ready=Unknown here by design).
    let mut problems = Vec::new();
    for s in &sites {
        for c in s.status.iter().flat_map(|st| &st.conditions) {
            if c.status == "False" {
                problems.push(format!(
                    "GeoSite {}: {}={} ({}) {}",
                    s.name_any(),
                    c.type_,
                    c.status,
                    c.reason,
                    c.message
                ));
            }
        }
    }
    for r in &reps {
        for c in r.status.iter().flat_map(|st| &st.conditions) {
            if c.status == "False" {
                problems.push(format!(
                    "Replicable {}: {}={} ({}) {}",
                    r.name_any(),
                    c.type_,
                    c.status,
                    c.reason,
                    c.message
                ));
            }
        }
    }
    if !problems.is_empty() {
        out.push('\n');
        for p in problems {
            out.push_str(p.trim_end());
            out.push('\n');
        }
    }
    out
}

fn role_rank(role: SiteRole) -> u8 {
    match role {
        SiteRole::Primary => 0,
        SiteRole::Secondary => 1,
        SiteRole::Disabled => 2,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use geoforge_crds::geosite::{EmbeddedForge, Forge, PublicKey};
    use geoforge_crds::replicable::{DataType, ReplicationCounts};
    use geoforge_crds::{GeoSiteSpec, GeoSiteStatus, ReplicableSpec, ReplicableStatus};

    pub fn now() -> DateTime<Utc> {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    pub fn cond(t: &str, ok: bool, reason: &str, msg: &str) -> Condition {
        let mut c = Condition::new(t, ok, reason, msg, Some(1));
        c.last_transition_time = now();
        c
    }

    pub fn site(name: &str, ns: &str, role: SiteRole) -> GeoSite {
        let spec: GeoSiteSpec = serde_json::from_value(serde_json::json!({
            "role": role.as_str(),
            "externalUrl": format!("https://git.{name}.example.com"),
        }))
        .unwrap();
        let mut s = GeoSite::new(name, spec);
        s.metadata.namespace = Some(ns.into());
        if role != SiteRole::Secondary {
            s.spec.forge = Some(Forge {
                embedded: Some(EmbeddedForge::default()),
                upstream: None,
                container: None,
            });
        }
        s.status = Some(GeoSiteStatus {
            conditions: vec![
                cond("Ready", true, "Available", ""),
                cond("Healthy", true, "Reporting", ""),
            ],
            public_keys: vec![PublicKey {
                kid: format!("{name}.1"),
                key: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
            }],
            last_status_time: Some(now() - chrono::Duration::seconds(12)),
            observed_generation: Some(1),
        });
        s
    }

    pub fn counts(total: i64, synced: i64, pending: i64, failed: i64) -> ReplicationCounts {
        ReplicationCounts {
            total,
            synced,
            failed,
            pending,
            verified: synced,
            verification_failed: 0,
        }
    }

    pub fn rep(name: &str, reports: &[(&str, ReplicationCounts, i64)]) -> Replicable {
        let spec: ReplicableSpec = serde_json::from_value(serde_json::json!({
            "type": "repository", "sourcePath": "repositories", "include": ["**/*.git"],
        }))
        .unwrap();
        let mut r = Replicable::new(name, spec);
        r.metadata.namespace = Some("geo-paris".into());
        assert_eq!(r.spec.data_type, DataType::Repository);
        r.status = Some(ReplicableStatus {
            sites: reports
                .iter()
                .map(|(s, c, lag)| SiteReplication {
                    site: s.to_string(),
                    counts: *c,
                    last_event_id: 481,
                    lag_seconds: *lag,
                })
                .collect(),
            summary: None,
            conditions: vec![
                cond("Synced", true, "AllSynced", ""),
                cond("Verified", true, "AllVerified", ""),
                cond("Ready", true, "Ready", ""),
            ],
            observed_generation: Some(1),
        });
        r
    }

    #[test]
    fn renders_sites_and_replication_rows() {
        let sites = vec![
            site("tokyo", "geo-tokyo", SiteRole::Secondary),
            site("paris", "geo-paris", SiteRole::Primary),
        ];
        let reps = vec![rep("repositories", &[("tokyo", counts(12, 12, 0, 0), 3)])];
        let out = render(&sites, &reps, now());
        let expected = "\
SITE    NAMESPACE   ROLE        REPLICAS   READY   REPLICATING   HEALTHY   KEYS      LAST STATUS
paris   geo-paris   primary     1          True    -             True      paris.1   12s ago
tokyo   geo-tokyo   secondary   1          True    -             True      tokyo.1   12s ago

REPLICABLE     NAMESPACE   TYPE         SITE    TOTAL   SYNCED   PENDING   FAILED   VERIFIED/FAILED   LAG   EVENT   CONDITIONS
repositories   geo-paris   repository   tokyo   12      12       0         0        12/0              3s    481     Synced=True,Verified=True,Ready=True
";
        assert_eq!(out, expected, "got:\n{out}");
    }

    #[test]
    fn a_secondary_without_a_report_shows_dashes_and_false_conditions_are_listed() {
        let sites = vec![
            site("paris", "geo-paris", SiteRole::Primary),
            site("tokyo", "geo-tokyo", SiteRole::Secondary),
            site("berlin", "geo-berlin", SiteRole::Secondary),
        ];
        let mut r = rep("repositories", &[("tokyo", counts(10, 7, 2, 1), 75)]);
        r.status.as_mut().unwrap().conditions[0] = cond(
            "Synced",
            false,
            "DeletesPaused",
            "60 deletes in 10m: confirm with the annotation",
        );
        let mut peer = cond("Ready", false, "NotLocal", "a peer");
        peer.status = "Unknown".into();
        let mut sites = sites;
        sites[2].status.as_mut().unwrap().conditions[0] = peer;
        let out = render(&sites, &[r], now());
        assert!(!out.contains("NotLocal"), "Unknown is not a problem: {out}");
        let berlin = out
            .lines()
            .find(|l| l.starts_with("repositories") && l.contains(" berlin "))
            .expect("a row for berlin");
        assert!(berlin.contains(" -   "), "{berlin}");
        let tokyo = out
            .lines()
            .find(|l| l.starts_with("repositories") && l.contains(" tokyo "))
            .expect("a row for tokyo");
        assert!(tokyo.contains("1m15s"), "lag is shown: {tokyo}");
        assert!(tokyo.contains("Synced=False"), "{tokyo}");
        assert!(
            out.contains("Replicable repositories: Synced=False (DeletesPaused) 60 deletes in 10m"),
            "{out}"
        );
    }

    #[test]
    fn explicit_sites_list_wins_over_every_secondary() {
        let sites = vec![
            site("tokyo", "geo-tokyo", SiteRole::Secondary),
            site("berlin", "geo-berlin", SiteRole::Secondary),
        ];
        let mut r = rep("repositories", &[]);
        r.spec.sites = vec!["berlin".into()];
        assert_eq!(expected_sites(&r, &sites), vec!["berlin".to_string()]);
        r.spec.sites.clear();
        assert_eq!(
            expected_sites(&r, &sites),
            vec!["berlin".to_string(), "tokyo".to_string()]
        );
    }

    #[test]
    fn empty_cluster_says_so() {
        let out = render(&[], &[], now());
        assert_eq!(out, "No GeoSites found.\n\nNo Replicables found.\n");
    }
}
