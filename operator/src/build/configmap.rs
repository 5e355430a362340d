//! The sidecar config (the `crds` crate's [`SidecarConfig`]) and the ConfigMap holding it.

use super::{Defaults, SiteKey, configmap_name, owned_meta, paths};
use geoforge_crds::config::{
    EmbeddedForgeConfig, ForgeConfig, KeyAlgorithm, Keys, LogConfig, PrimaryDiscovery,
    ReplicableConfig, SelectiveSyncConfig, SidecarConfig, TrustedKey,
};
use geoforge_crds::geosite::SiteRole;
use geoforge_crds::{GeoSite, Replicable, duration};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The file name of the private key inside the key Secret (and its mount).
pub const PRIVATE_KEY_FILE: &str = "private.pem";

/// The primary among `sites`, if there is exactly one.
pub fn the_primary(sites: &[GeoSite]) -> Option<&GeoSite> {
    let mut primaries = sites.iter().filter(|s| s.spec.role == SiteRole::Primary);
    match (primaries.next(), primaries.next()) {
        (Some(p), None) => Some(p),
        _ => None,
    }
}

/// The replicables a site's sidecar is configured with: every one on the primary (it serves
/// every catalog), those that apply to it on a secondary, none on a disabled site.
pub fn replicables_for<'a>(site: &GeoSite, replicables: &'a [Replicable]) -> Vec<&'a Replicable> {
    let name = site.name_any();
    let mut out: Vec<&Replicable> = match site.spec.role {
        SiteRole::Primary => replicables.iter().collect(),
        SiteRole::Secondary => replicables
            .iter()
            .filter(|r| r.spec.applies_to(&name))
            .collect(),
        SiteRole::Disabled => vec![],
    };
    out.sort_by_key(|r| r.name_any());
    out
}

fn replicable_config(r: &Replicable) -> ReplicableConfig {
    ReplicableConfig {
        name: r.name_any(),
        data_type: r.spec.data_type,
        source_path: r.spec.source_path.clone(),
        include: r.spec.include.clone(),
        exclude: r.spec.exclude.clone(),
        url_mapping: r.spec.url_mapping.clone(),
        id_template: r.spec.id_template.clone(),
        // The CRD's pattern admits only parseable strings; a default keeps the sidecar running
        // should an old object slip through.
        verification_interval: duration::parse(&r.spec.verification_interval)
            .unwrap_or(Duration::from_secs(86_400)),
        concurrency: r.spec.concurrency.max(1) as u32,
    }
}

/// Keys the site trusts: every site's declared `publicKeys` (its own included, for rotation)
/// plus its own current key from its Secret (so the operator's `admin` tokens verify before
/// the user has copied the key into the spec). Sorted by kid, one entry per kid.
pub fn trusted_keys(site: &GeoSite, all_sites: &[GeoSite], own: &SiteKey) -> Vec<TrustedKey> {
    let mut by_kid: BTreeMap<String, TrustedKey> = BTreeMap::new();
    let mut add = |kid: &str, site: &str, key: &str| {
        by_kid.entry(kid.to_string()).or_insert_with(|| TrustedKey {
            kid: kid.to_string(),
            site: Some(site.to_string()),
            algorithm: KeyAlgorithm::EdDSA,
            public_key: Some(key.to_string()),
            secret_file: None,
        });
    };
    add(&own.kid, &site.name_any(), &own.public_key);
    for s in all_sites {
        let name = s.name_any();
        for k in &s.spec.public_keys {
            // A kid must start with its site's name (the CRD enforces it); skip any that does not,
            // so a peer can never vouch for another site's key id.
            if k.kid.starts_with(&format!("{name}.")) {
                add(&k.kid, &name, &k.key);
            }
        }
    }
    by_kid.into_values().collect()
}

/// Renders the sidecar config of a local site.
pub fn sidecar_config(
    site: &GeoSite,
    all_sites: &[GeoSite],
    replicables: &[Replicable],
    key: &SiteKey,
    defaults: &Defaults,
) -> SidecarConfig {
    let spec = &site.spec;
    let name = site.name_any();
    let primary = the_primary(all_sites);
    let forge = spec.forge.as_ref().map(|f| {
        if let Some(e) = &f.embedded {
            ForgeConfig {
                embedded: Some(EmbeddedForgeConfig {
                    repositories_dir: None,
                    credentials_file: e.credentials_secret.as_ref().map(|_| {
                        PathBuf::from(format!("{}/credentials", paths::FORGE_CREDENTIALS_DIR))
                    }),
                    anonymous_read: e.anonymous_read,
                    public_repositories: e.public_repositories.clone(),
                    git_binary: None,
                }),
                upstream_url: None,
                hook_token_file: None,
            }
        } else if let Some(u) = &f.upstream {
            ForgeConfig {
                embedded: None,
                upstream_url: Some(u.url.clone()),
                hook_token_file: u
                    .hook_token_secret
                    .as_ref()
                    .map(|_| PathBuf::from(format!("{}/token", paths::HOOK_TOKEN_DIR))),
            }
        } else if let Some(c) = &f.container {
            ForgeConfig {
                embedded: None,
                upstream_url: Some(format!("http://127.0.0.1:{}", c.http_port)),
                hook_token_file: c
                    .hook_token_secret
                    .as_ref()
                    .map(|_| PathBuf::from(format!("{}/token", paths::HOOK_TOKEN_DIR))),
            }
        } else {
            // The CRD requires exactly one variant; an empty forge renders as the embedded one.
            ForgeConfig {
                embedded: Some(EmbeddedForgeConfig::default()),
                upstream_url: None,
                hook_token_file: None,
            }
        }
    });
    SidecarConfig {
        site_id: name.clone(),
        role: spec.role,
        instance: None,
        external_url: spec.external_url.clone(),
        primary_external_url: match spec.role {
            SiteRole::Secondary => primary.map(|p| p.spec.external_url.clone()),
            _ => None,
        },
        allow_insecure: spec.allow_insecure,
        listen: geoforge_crds::config::Listen {
            service: format!("0.0.0.0:{}", super::SERVICE_PORT),
            admin: format!("0.0.0.0:{}", super::ADMIN_PORT),
        },
        state_dir: PathBuf::from(paths::STATE_DIR),
        storage_root: PathBuf::from(paths::REPOSITORIES_DIR),
        primary: match spec.role {
            SiteRole::Secondary => Some(PrimaryDiscovery {
                internal_api: Some(defaults.proxy_config_url.clone()),
                static_url: None,
                poll_interval: Duration::from_secs(10),
            }),
            _ => None,
        },
        keys: Keys {
            kid: key.kid.clone(),
            private_key_file: PathBuf::from(format!("{}/{PRIVATE_KEY_FILE}", paths::KEYS_DIR)),
            trusted: trusted_keys(site, all_sites, key),
            max_token_validity: Duration::from_secs(60),
        },
        trusted_proxies: spec.trusted_proxies.iter().map(|c| c.0.clone()).collect(),
        push_redirect: spec.push_redirect,
        forge,
        replicables: replicables_for(site, replicables)
            .into_iter()
            .map(replicable_config)
            .collect(),
        selective_sync: spec
            .selective_sync
            .as_ref()
            .map(|s| SelectiveSyncConfig {
                include: s.include.clone(),
                exclude: s.exclude.clone(),
            })
            .unwrap_or_default(),
        max_staleness: duration::parse(&spec.max_staleness).unwrap_or(Duration::from_secs(300)),
        proxy: Default::default(),
        geo: Default::default(),
        acceleration: Default::default(),
        log: LogConfig::default(),
    }
}

/// SHA-256 (hex) of the rendered config, for the pod template annotation.
pub fn checksum(yaml: &str) -> String {
    hex::encode(Sha256::digest(yaml.as_bytes()))
}

/// The ConfigMap with the rendered config under `sidecar.yaml`.
pub fn configmap(site: &GeoSite, config: &SidecarConfig) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(site, configmap_name(&site.name_any())),
        data: Some(BTreeMap::from([(
            paths::CONFIG_KEY.to_string(),
            config.to_yaml(),
        )])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;

    fn all() -> Vec<GeoSite> {
        vec![paris(), tokyo(), berlin_container()]
    }

    fn render(site: &GeoSite, sites: &[GeoSite]) -> ConfigMap {
        let cfg = sidecar_config(
            site,
            sites,
            &replicables(),
            &key(&site.name_any()),
            &defaults(),
        );
        configmap(site, &cfg)
    }

    #[test]
    fn golden_configmap_primary() {
        let sites = vec![paris(), tokyo()];
        let cm = render(&paris(), &sites);
        assert_golden("configmap-paris", &serde_json::to_value(&cm).unwrap());
    }

    #[test]
    fn golden_configmap_secondary() {
        let sites = vec![paris(), tokyo()];
        let cm = render(&tokyo(), &sites);
        assert_golden("configmap-tokyo", &serde_json::to_value(&cm).unwrap());
    }

    #[test]
    fn golden_configmap_container_forge() {
        let sites = vec![berlin_container(), tokyo()];
        let cm = render(&berlin_container(), &sites);
        assert_golden("configmap-berlin", &serde_json::to_value(&cm).unwrap());
    }

    /// Golden: the sidecar's own parser accepts every ConfigMap the builders produce, and reads
    /// back exactly what was rendered.
    #[test]
    fn sidecar_parser_accepts_every_rendered_config() {
        let mut cases = vec![];
        for site in all() {
            for peers in [vec![site.clone()], all()] {
                let mut sites = peers.clone();
                if !sites.iter().any(|s| s.name_any() == site.name_any()) {
                    sites.push(site.clone());
                }
                cases.push((site.clone(), sites));
            }
        }
        let mut disabled = paris();
        disabled.spec.role = SiteRole::Disabled;
        cases.push((disabled.clone(), vec![disabled]));
        let mut upstream = berlin_container();
        upstream.spec.forge = Some(geoforge_crds::geosite::Forge {
            embedded: None,
            upstream: Some(geoforge_crds::geosite::UpstreamForge {
                url: "http://gitea-http:3000".into(),
                hook_token_secret: Some("gitea-hook".into()),
            }),
            container: None,
        });
        cases.push((upstream.clone(), vec![upstream, tokyo()]));
        assert!(cases.len() >= 8);
        for (site, sites) in cases {
            let cm = render(&site, &sites);
            let yaml = &cm.data.as_ref().unwrap()[paths::CONFIG_KEY];
            let parsed = SidecarConfig::from_yaml(yaml, "configmap").unwrap_or_else(|e| {
                panic!(
                    "sidecar refuses the config of {}: {e}\n{yaml}",
                    site.name_any()
                )
            });
            let expected = sidecar_config(
                &site,
                &sites,
                &replicables(),
                &key(&site.name_any()),
                &defaults(),
            );
            assert_eq!(parsed, expected, "round trip of {}", site.name_any());
        }
    }

    #[test]
    fn secondary_gets_applicable_replicables_and_discovery() {
        let sites = vec![paris(), tokyo()];
        let cfg = sidecar_config(&tokyo(), &sites, &replicables(), &key("tokyo"), &defaults());
        // lfs-objects applies to london only.
        let names: Vec<_> = cfg.replicables.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["repositories"]);
        assert_eq!(
            cfg.primary.as_ref().unwrap().internal_api.as_deref(),
            Some(defaults().proxy_config_url.as_str())
        );
        assert_eq!(
            cfg.primary_external_url.as_deref(),
            Some("https://git.paris.example.com")
        );
        let kids: Vec<_> = cfg.keys.trusted.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, ["paris.1", "tokyo.1"]);
        assert_eq!(
            cfg.keys.private_key_file,
            PathBuf::from("/etc/geoforge/keys/private.pem")
        );
        // The primary serves every catalog.
        let p = sidecar_config(&paris(), &sites, &replicables(), &key("paris"), &defaults());
        assert_eq!(p.replicables.len(), 2);
        assert!(p.primary.is_none());
    }

    #[test]
    fn a_peer_cannot_vouch_for_another_sites_kid() {
        let mut evil = tokyo();
        evil.spec.public_keys[0].kid = "paris.9".into();
        let trusted = trusted_keys(&paris(), &[paris(), evil], &key("paris"));
        assert!(trusted.iter().all(|k| k.kid != "paris.9"));
    }

    #[test]
    fn checksum_changes_with_the_config() {
        let sites = vec![paris(), tokyo()];
        let a = render(&tokyo(), &sites);
        let mut t2 = tokyo();
        t2.spec.max_staleness = "10m".into();
        let b = render(&t2, &[paris(), t2.clone()]);
        let ya = &a.data.unwrap()[paths::CONFIG_KEY];
        let yb = &b.data.unwrap()[paths::CONFIG_KEY];
        assert_ne!(checksum(ya), checksum(yb));
        assert_eq!(checksum(ya).len(), 64);
    }
}
