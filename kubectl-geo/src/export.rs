//! `kubectl geo export-site SITE`: the `GeoSite` as a clean manifest carrying the public keys
//! the site signs with now (from status), to apply in every other cluster (DESIGN §7: the same
//! manifests everywhere; peers are known by URL and public key only).

use geoforge_crds::GeoSite;
use geoforge_crds::geosite::PublicKey;
use kube::ResourceExt;

/// The exported manifest and the warnings met on the way.
#[derive(Debug)]
pub struct Export {
    pub manifest: GeoSite,
    pub warnings: Vec<String>,
}

/// Builds the manifest: the site's spec, with `publicKeys` = the keys in `spec` plus the keys
/// in use from `status` (by `kid`; the key in use wins where they disagree), and nothing of
/// the cluster-local metadata (uid, resourceVersion, managed fields, status).
pub fn export_site(site: &GeoSite) -> Export {
    let mut warnings = Vec::new();
    let mut keys: Vec<PublicKey> = site.spec.public_keys.clone();
    let in_use = site
        .status
        .as_ref()
        .map(|s| s.public_keys.clone())
        .unwrap_or_default();
    for k in &in_use {
        match keys.iter_mut().find(|e| e.kid == k.kid) {
            Some(e) if e.key != k.key => {
                warnings.push(format!(
                    "spec.publicKeys lists {} with another key than the one in use; exporting the key in use",
                    k.kid
                ));
                e.key = k.key.clone();
            }
            Some(_) => {}
            None => keys.push(k.clone()),
        }
    }
    if keys.is_empty() {
        warnings.push(format!(
            "{} has no public key yet: the operator of its cluster generates it on first apply (is {} in --local-sites there?)",
            site.name_any(),
            site.name_any()
        ));
    }
    let mut spec = site.spec.clone();
    spec.public_keys = keys;
    let mut manifest = GeoSite::new(&site.name_any(), spec);
    manifest.metadata.namespace = site.namespace();
    manifest.metadata.labels = site.metadata.labels.clone();
    Export { manifest, warnings }
}

/// The manifest as YAML with a header saying where it came from.
pub fn to_yaml(export: &Export) -> anyhow::Result<String> {
    let mut out = String::from(
        "# Exported by `kubectl geo export-site`: apply in every other cluster of this Geo setup.\n",
    );
    for w in &export.warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    out.push_str(&serde_saphyr::to_string(&export.manifest)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::site;
    use geoforge_crds::geosite::SiteRole;

    #[test]
    fn exports_spec_with_keys_in_use_and_no_local_metadata() {
        let mut s = site("paris", "geo-paris", SiteRole::Primary);
        s.metadata.uid = Some("0000-1111".into());
        s.metadata.resource_version = Some("42".into());
        let e = export_site(&s);
        assert!(e.warnings.is_empty(), "{:?}", e.warnings);
        assert_eq!(e.manifest.spec.public_keys.len(), 1);
        assert_eq!(e.manifest.spec.public_keys[0].kid, "paris.1");
        assert!(e.manifest.status.is_none());
        let yaml = to_yaml(&e).unwrap();
        let back: GeoSite = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back.spec, e.manifest.spec);
        assert_eq!(back.namespace().as_deref(), Some("geo-paris"));
        assert!(back.metadata.uid.is_none() && back.metadata.resource_version.is_none());
        assert!(yaml.contains("kind: GeoSite"), "{yaml}");
        assert!(!yaml.contains("status"), "no status, not even null: {yaml}");
        assert!(!yaml.contains("null"), "{yaml}");
    }

    #[test]
    fn key_in_use_wins_and_rotation_keys_are_kept() {
        let mut s = site("paris", "geo-paris", SiteRole::Primary);
        s.spec.public_keys = vec![
            PublicKey {
                kid: "paris.1".into(),
                key: "A".repeat(43),
            },
            PublicKey {
                kid: "paris.2".into(),
                key: "B".repeat(43),
            },
        ];
        let e = export_site(&s);
        let kids: Vec<_> = e
            .manifest
            .spec
            .public_keys
            .iter()
            .map(|k| k.kid.as_str())
            .collect();
        assert_eq!(kids, ["paris.1", "paris.2"]);
        assert_eq!(
            e.manifest.spec.public_keys[0].key,
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(e.warnings.len(), 1, "{:?}", e.warnings);
    }

    #[test]
    fn a_site_without_keys_is_exported_with_a_warning() {
        let mut s = site("tokyo", "geo-tokyo", SiteRole::Secondary);
        s.status = None;
        let e = export_site(&s);
        assert!(e.manifest.spec.public_keys.is_empty());
        assert!(
            to_yaml(&e)
                .unwrap()
                .contains("# warning: tokyo has no public key yet")
        );
    }
}
