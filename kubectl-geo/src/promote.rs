//! `kubectl geo promote SITE`: the preflight that decides whether a secondary may take over,
//! and the patches that switch the roles.
//!
//! The preflight refuses when the target is behind: a replicable that applies to it has
//! pending, in-flight or failed items, lag above the threshold, or no report at all (unknown is
//! treated as behind). `--force` overrides exactly these checks, never the structural ones
//! (unknown site, ambiguous name, not a secondary, no forge to front).

use crate::status::{expected_sites, report};
use geoforge_crds::geosite::SiteRole;
use geoforge_crds::{GeoSite, Replicable};
use kube::ResourceExt;
use serde_json::{Value, json};

/// A `GeoSite` by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRef {
    pub namespace: String,
    pub name: String,
}

impl SiteRef {
    fn of(s: &GeoSite) -> SiteRef {
        SiteRef {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
        }
    }
}

impl std::fmt::Display for SiteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a promotion will do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub target: SiteRef,
    /// Current primaries, demoted to secondary first (never two primaries at once).
    pub demote: Vec<SiteRef>,
    /// The target runs several instances; a primary runs exactly one, so it is scaled to 1.
    pub scale_to_one: bool,
    /// Behind-checks that failed and were overridden by `--force`.
    pub overridden: Vec<String>,
}

/// Why a promotion was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Cannot be done, `--force` or not.
    Invalid(String),
    /// The target is behind (or its state is unknown); `--force` overrides.
    Behind(Vec<String>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(m) => write!(f, "{m}"),
            Refusal::Behind(reasons) => {
                writeln!(f, "refusing to promote: the target is behind")?;
                for r in reasons {
                    writeln!(f, "  - {r}")?;
                }
                write!(
                    f,
                    "wait for replication to catch up, or pass --force to promote anyway (writes not yet replicated to it are lost)"
                )
            }
        }
    }
}

/// Decides whether `target` may become the primary. Pure: the caller fetched `sites` and `reps`.
pub fn preflight(
    target: &str,
    sites: &[GeoSite],
    reps: &[Replicable],
    max_lag_seconds: i64,
    force: bool,
) -> Result<Plan, Refusal> {
    let matches: Vec<&GeoSite> = sites.iter().filter(|s| s.name_any() == target).collect();
    let t = match matches.as_slice() {
        [] => {
            return Err(Refusal::Invalid(format!(
                "no GeoSite named {target:?} (kubectl get geosites -A)"
            )));
        }
        [one] => *one,
        many => {
            let where_: Vec<String> = many.iter().map(|s| SiteRef::of(s).to_string()).collect();
            return Err(Refusal::Invalid(format!(
                "GeoSite {target:?} exists in several namespaces ({}): choose one with -n",
                where_.join(", ")
            )));
        }
    };
    match t.spec.role {
        SiteRole::Primary => {
            return Err(Refusal::Invalid(format!("{target} is already the primary")));
        }
        SiteRole::Disabled => {
            return Err(Refusal::Invalid(format!(
                "{target} has Geo disabled: promote moves the primary role between Geo sites; set its role with kubectl edit"
            )));
        }
        SiteRole::Secondary => {}
    }
    if t.spec.forge.is_none() {
        return Err(Refusal::Invalid(format!(
            "{target} has no forge: a primary fronts one (spec.forge.embedded, upstream or container); add it to the GeoSite first"
        )));
    }

    let mut behind = Vec::new();
    let mut applicable = 0;
    for rep in reps {
        if !expected_sites(rep, sites).iter().any(|s| s == target) {
            continue;
        }
        applicable += 1;
        let name = rep.name_any();
        let Some(r) = report(rep, target) else {
            behind.push(format!("{name}: no status reported for {target}"));
            continue;
        };
        let c = r.counts;
        if c.pending > 0 {
            behind.push(format!("{name}: {} pending items", c.pending));
        }
        if c.failed > 0 {
            behind.push(format!("{name}: {} failed items", c.failed));
        }
        let in_flight = c.total - c.synced - c.pending - c.failed;
        if in_flight > 0 {
            behind.push(format!("{name}: {in_flight} items syncing now"));
        }
        if r.lag_seconds > max_lag_seconds {
            behind.push(format!(
                "{name}: lag {}s is above --max-lag {max_lag_seconds}s",
                r.lag_seconds
            ));
        }
    }
    if applicable == 0 && !reps.is_empty() {
        // Nothing replicates to the target: it has none of the primary's data.
        behind.push(format!(
            "no Replicable applies to {target}: it holds none of the primary's data"
        ));
    }
    if let Some(h) = t
        .status
        .as_ref()
        .and_then(|s| geoforge_crds::condition::find(&s.conditions, "Healthy"))
        && !h.is_true()
    {
        behind.push(format!(
            "{target} is not Healthy ({}: {})",
            h.reason, h.message
        ));
    }
    if !behind.is_empty() && !force {
        return Err(Refusal::Behind(behind));
    }
    Ok(Plan {
        target: SiteRef::of(t),
        demote: sites
            .iter()
            .filter(|s| s.spec.role == SiteRole::Primary)
            .map(SiteRef::of)
            .collect(),
        scale_to_one: t.spec.replicas != 1,
        overridden: behind,
    })
}

/// Merge patch that demotes a primary.
pub fn demote_patch() -> Value {
    json!({ "spec": { "role": "secondary" } })
}

/// Merge patch that promotes the target (a primary runs exactly one replica).
pub fn promote_patch() -> Value {
    json!({ "spec": { "role": "primary", "replicas": 1 } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{counts, rep, site};

    fn world() -> Vec<GeoSite> {
        let mut tokyo = site("tokyo", "geo-tokyo", SiteRole::Secondary);
        tokyo.spec.forge = site("paris", "geo-paris", SiteRole::Primary).spec.forge;
        vec![site("paris", "geo-paris", SiteRole::Primary), tokyo]
    }

    #[test]
    fn caught_up_secondary_is_promoted_and_the_primary_demoted() {
        let reps = [rep("repositories", &[("tokyo", counts(12, 12, 0, 0), 2)])];
        let plan = preflight("tokyo", &world(), &reps, 60, false).unwrap();
        assert_eq!(plan.target.to_string(), "geo-tokyo/tokyo");
        assert_eq!(
            plan.demote,
            vec![SiteRef {
                namespace: "geo-paris".into(),
                name: "paris".into()
            }]
        );
        assert!(!plan.scale_to_one);
        assert!(plan.overridden.is_empty());
        assert_eq!(promote_patch()["spec"]["role"], "primary");
        assert_eq!(promote_patch()["spec"]["replicas"], 1);
        assert_eq!(demote_patch()["spec"]["role"], "secondary");
    }

    #[test]
    fn pending_failed_and_lag_refuse_without_force() {
        let reps = [rep("repositories", &[("tokyo", counts(12, 8, 2, 1), 600)])];
        let err = preflight("tokyo", &world(), &reps, 60, false).unwrap_err();
        let Refusal::Behind(reasons) = &err else {
            panic!("{err:?}")
        };
        let all = reasons.join("\n");
        assert!(all.contains("2 pending items"), "{all}");
        assert!(all.contains("1 failed items"), "{all}");
        assert!(all.contains("1 items syncing now"), "{all}");
        assert!(all.contains("lag 600s is above --max-lag 60s"), "{all}");
        assert!(err.to_string().contains("--force"));
        // The same state with --force goes through and says what was overridden.
        let plan = preflight("tokyo", &world(), &reps, 60, true).unwrap();
        assert_eq!(plan.overridden.len(), 4);
    }

    #[test]
    fn lag_at_the_threshold_is_accepted_and_one_second_more_is_not() {
        let ok = [rep("repositories", &[("tokyo", counts(3, 3, 0, 0), 60)])];
        assert!(preflight("tokyo", &world(), &ok, 60, false).is_ok());
        let late = [rep("repositories", &[("tokyo", counts(3, 3, 0, 0), 61)])];
        assert!(matches!(
            preflight("tokyo", &world(), &late, 60, false),
            Err(Refusal::Behind(_))
        ));
    }

    #[test]
    fn missing_report_counts_as_behind() {
        let reps = [rep("repositories", &[])];
        let err = preflight("tokyo", &world(), &reps, 60, false).unwrap_err();
        assert!(
            err.to_string().contains("no status reported for tokyo"),
            "{err}"
        );
    }

    #[test]
    fn unhealthy_target_is_behind() {
        let mut sites = world();
        sites[1].status.as_mut().unwrap().conditions[1] =
            crate::status::tests::cond("Healthy", false, "NoReport", "no status for 5m");
        let reps = [rep("repositories", &[("tokyo", counts(1, 1, 0, 0), 0)])];
        let err = preflight("tokyo", &sites, &reps, 60, false).unwrap_err();
        assert!(err.to_string().contains("not Healthy (NoReport"), "{err}");
    }

    #[test]
    fn structural_problems_are_refused_even_with_force() {
        let reps = [rep("repositories", &[("tokyo", counts(1, 1, 0, 0), 0)])];
        for (target, sites, want) in [
            ("nowhere", world(), "no GeoSite named"),
            ("paris", world(), "already the primary"),
            (
                "tokyo",
                vec![site("tokyo", "geo-tokyo", SiteRole::Secondary)],
                "has no forge",
            ),
            (
                "tokyo",
                {
                    let mut w = world();
                    w.push(w[1].clone());
                    w[2].metadata.namespace = Some("other".into());
                    w
                },
                "several namespaces",
            ),
        ] {
            let err = preflight(target, &sites, &reps, 60, true).unwrap_err();
            assert!(
                matches!(&err, Refusal::Invalid(m) if m.contains(want)),
                "{target}: {err:?}"
            );
        }
    }

    #[test]
    fn a_scaled_out_secondary_is_scaled_to_one() {
        let mut sites = world();
        sites[1].spec.replicas = 3;
        let reps = [rep("repositories", &[("tokyo", counts(1, 1, 0, 0), 0)])];
        assert!(
            preflight("tokyo", &sites, &reps, 60, false)
                .unwrap()
                .scale_to_one
        );
    }
}
