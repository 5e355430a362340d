//! Checks across all `GeoSite`s of the watch scope (one Geo deployment). Pure.

use geoforge_crds::GeoSite;
use geoforge_crds::geosite::SiteRole;
use kube::ResourceExt;

/// Something wrong with a site's spec in the context of the other sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase condition reason.
    pub reason: &'static str,
    pub message: String,
    /// When true the site's workloads are not applied (existing ones are left untouched).
    pub blocking: bool,
}

pub const PRIMARY_CONFLICT: &str = "PrimaryConflict";
pub const NO_PRIMARY: &str = "NoPrimary";
pub const DUPLICATE_SITE: &str = "DuplicateSiteName";

/// Names of the primary sites, sorted.
pub fn primaries(all: &[GeoSite]) -> Vec<String> {
    let mut p: Vec<String> = all
        .iter()
        .filter(|s| s.spec.role == SiteRole::Primary && s.metadata.deletion_timestamp.is_none())
        .map(|s| s.name_any())
        .collect();
    p.sort();
    p.dedup();
    p
}

/// Problems of `site` among `all` (which should contain `site`).
///
/// - Two or more primaries: blocking for every site. A second primary would take writes that
///   nobody replicates (split brain), so nothing is applied until one is demoted; secondaries
///   get "primary unknown" from the proxy-config API meanwhile.
/// - A secondary with no primary: not blocking. The sidecar runs and behaves as "primary
///   unknown" (DESIGN §3) until a primary appears.
/// - Two sites with the same name in different namespaces: blocking (a site id must be unique).
pub fn validate_site(site: &GeoSite, all: &[GeoSite]) -> Vec<Problem> {
    let name = site.name_any();
    let mut problems = vec![];
    let mut namespaces: Vec<String> = all
        .iter()
        .filter(|s| s.name_any() == name)
        .filter_map(|s| s.namespace())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    if namespaces.len() > 1 {
        problems.push(Problem {
            reason: DUPLICATE_SITE,
            message: format!(
                "site {name:?} exists in namespaces {}: a site id must be unique among the GeoSites this operator watches",
                namespaces.join(", ")
            ),
            blocking: true,
        });
    }
    let mut prim = primaries(all);
    if site.spec.role == SiteRole::Primary && !prim.contains(&name) {
        prim.push(name.clone());
        prim.sort();
    }
    if prim.len() > 1 {
        problems.push(Problem {
            reason: PRIMARY_CONFLICT,
            message: format!(
                "sites {} are all primary: a Geo deployment has exactly one primary; set role: secondary on all but one",
                prim.join(", ")
            ),
            blocking: true,
        });
    } else if prim.is_empty() && site.spec.role == SiteRole::Secondary {
        problems.push(Problem {
            reason: NO_PRIMARY,
            message: "no GeoSite has role: primary; this secondary serves nothing locally and replicates nothing until one exists".into(),
            blocking: false,
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;

    #[test]
    fn two_primaries_block_every_site() {
        let mut second = tokyo();
        second.spec.role = SiteRole::Primary;
        second.spec.replicas = 1;
        let all = vec![paris(), second.clone()];
        for s in &all {
            let p = validate_site(s, &all);
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].reason, PRIMARY_CONFLICT);
            assert!(p[0].blocking);
            assert!(p[0].message.contains("paris, tokyo"), "{}", p[0].message);
        }
    }

    #[test]
    fn secondary_without_primary_is_a_warning() {
        let p = validate_site(&tokyo(), &[tokyo()]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].reason, NO_PRIMARY);
        assert!(!p[0].blocking);
        assert!(validate_site(&tokyo(), &[paris(), tokyo()]).is_empty());
        assert!(validate_site(&paris(), &[paris()]).is_empty());
    }

    #[test]
    fn duplicate_names_across_namespaces() {
        let mut other = tokyo();
        other.metadata.namespace = Some("elsewhere".into());
        let p = validate_site(&tokyo(), &[paris(), tokyo(), other]);
        assert!(p.iter().any(|p| p.reason == DUPLICATE_SITE && p.blocking));
    }
}
