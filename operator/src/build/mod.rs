//! Pure builders: a local `GeoSite`, the `Replicable`s and the peer sites in, Kubernetes objects
//! out. Nothing here talks to the API server or reads the clock, so every builder has a golden
//! test (`golden/*.json`, regenerate with `UPDATE_GOLDEN=1 cargo test -p geo-operator`).
//!
//! Object names (all in the `GeoSite`'s namespace):
//!
//! | object | name |
//! |---|---|
//! | StatefulSet, client Service | `<site>-geo` |
//! | headless Service | `<site>-geo-headless` |
//! | ConfigMap (sidecar config) | `<site>-geo-config` |
//! | key Secret (never owned) | `<site>-geo-key` |

pub mod configmap;
pub mod secret;
pub mod service;
pub mod statefulset;

use geoforge_crds::GeoSite;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "geoforge-operator";
/// Service port (client traffic and the Geo API).
pub const SERVICE_PORT: i32 = 8080;
/// Admin port (health, metrics, `/-/geo/status`).
pub const ADMIN_PORT: i32 = 8081;
/// Pod template annotation carrying the SHA-256 of the rendered config: a config change rolls the pods.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "geoforge.dev/config-checksum";
/// Label naming the site on every object the operator creates.
pub const SITE_LABEL: &str = "geoforge.dev/site";
/// Label marking key Secrets (so a person can find them: `kubectl get secret -l geoforge.dev/key`).
pub const KEY_LABEL: &str = "geoforge.dev/key";

/// Where the pod mounts things. The sidecar config refers to these paths.
pub mod paths {
    pub const CONFIG_DIR: &str = "/etc/geoforge/config";
    pub const CONFIG_FILE: &str = "/etc/geoforge/config/sidecar.yaml";
    pub const CONFIG_KEY: &str = "sidecar.yaml";
    pub const KEYS_DIR: &str = "/etc/geoforge/keys";
    pub const FORGE_CREDENTIALS_DIR: &str = "/etc/geoforge/forge";
    pub const HOOK_TOKEN_DIR: &str = "/etc/geoforge/hook";
    pub const STATE_DIR: &str = "/var/lib/geoforge/state";
    pub const REPOSITORIES_DIR: &str = "/var/lib/geoforge/repositories";
    pub const TMP_DIR: &str = "/tmp";
}

/// Operator-wide defaults the builders need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// Sidecar image when the site does not name one.
    pub sidecar_image: String,
    /// Base URL of this operator's proxy-config API as the sidecars reach it.
    pub proxy_config_url: String,
}

/// The public half of a site's key, as read from its key Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteKey {
    pub kid: String,
    pub public_key: String,
}

pub fn statefulset_name(site: &str) -> String {
    format!("{site}-geo")
}
pub fn client_service_name(site: &str) -> String {
    format!("{site}-geo")
}
pub fn headless_service_name(site: &str) -> String {
    format!("{site}-geo-headless")
}
pub fn configmap_name(site: &str) -> String {
    format!("{site}-geo-config")
}
pub fn key_secret_name(site: &str) -> String {
    format!("{site}-geo-key")
}

/// Labels that select a site's pods (stable: part of the StatefulSet's immutable selector).
pub fn selector_labels(site: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "geoforge-sidecar".into()),
        (SITE_LABEL.into(), site.into()),
    ])
}

/// Labels on every object of a site.
pub fn labels(site: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(site);
    l.insert("app.kubernetes.io/instance".into(), site.into());
    l.insert("app.kubernetes.io/component".into(), "geo-sidecar".into());
    l.insert("app.kubernetes.io/part-of".into(), "geoforge".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "geoforge-operator".into(),
    );
    l
}

/// The controller owner reference to the site (`controller: true`, `blockOwnerDeletion: true`).
pub fn owner_ref(site: &GeoSite) -> OwnerReference {
    site.controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: format!("{}/{}", geoforge_crds::GROUP, geoforge_crds::VERSION),
            kind: "GeoSite".into(),
            name: site.name_any(),
            uid: site.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// Metadata of an owned object of `site`.
pub fn owned_meta(site: &GeoSite, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: site.namespace(),
        labels: Some(labels(&site.name_any())),
        owner_references: Some(vec![owner_ref(site)]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
pub(crate) mod testdata {
    //! Fixed inputs shared by the golden tests and the reconciler tests.
    use super::*;
    use geoforge_crds::geosite::*;
    use geoforge_crds::replicable::*;
    use geoforge_crds::{GeoSiteSpec, Replicable, ReplicableSpec};

    pub const PARIS_KEY: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    pub const TOKYO_KEY: &str = "J5Ar9CidHaLSPcuKYPCvmMWLygRLSY4x1Zqg7zffLJ8";

    pub fn defaults() -> Defaults {
        Defaults {
            sidecar_image: "ghcr.io/geoforge/geo-sidecar:0.1.0".into(),
            proxy_config_url: "http://geo-operator.geoforge-system.svc:8082".into(),
        }
    }

    fn meta(name: &str, uid: &str, generation: i64) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("geo".into()),
            uid: Some(uid.into()),
            generation: Some(generation),
            ..ObjectMeta::default()
        }
    }

    fn spec(role: SiteRole, url: &str) -> GeoSiteSpec {
        serde_json::from_value(serde_json::json!({
            "role": role.as_str(),
            "externalUrl": url,
        }))
        .expect("minimal spec")
    }

    /// Primary with an embedded forge, credentials and a new repository PVC.
    pub fn paris() -> GeoSite {
        let mut s = spec(SiteRole::Primary, "https://git.paris.example.com");
        s.internal_url = Some("https://geo.paris.example.com".into());
        s.public_keys = vec![PublicKey {
            kid: "paris.1".into(),
            key: PARIS_KEY.into(),
        }];
        s.trusted_proxies = vec![Cidr("10.0.0.0/8".into())];
        s.storage.repositories.size = Some("50Gi".into());
        s.storage.state.size = Some("2Gi".into());
        s.forge = Some(Forge {
            embedded: Some(EmbeddedForge {
                credentials_secret: Some("paris-forge-users".into()),
                anonymous_read: false,
                public_repositories: vec!["open/handbook.git".into()],
            }),
            upstream: None,
            container: None,
        });
        let mut gs = GeoSite::new("paris", s);
        gs.metadata = meta("paris", "uid-paris", 3);
        gs
    }

    /// Secondary with two replicas and selective sync.
    pub fn tokyo() -> GeoSite {
        let mut s = spec(SiteRole::Secondary, "https://git.tokyo.example.com");
        s.internal_url = Some("https://geo.tokyo.example.com".into());
        s.replicas = 2;
        s.public_keys = vec![PublicKey {
            kid: "tokyo.1".into(),
            key: TOKYO_KEY.into(),
        }];
        s.storage.repositories.size = Some("50Gi".into());
        s.storage.repositories.storage_class = Some("fast".into());
        s.selective_sync = Some(SelectiveSync {
            include: vec!["**".into()],
            exclude: vec!["archive/**".into()],
        });
        let mut gs = GeoSite::new("tokyo", s);
        gs.metadata = meta("tokyo", "uid-tokyo", 1);
        gs
    }

    /// Primary fronting a forge container on an existing claim.
    pub fn berlin_container() -> GeoSite {
        let mut s = spec(SiteRole::Primary, "https://git.berlin.example.com");
        s.storage.repositories.existing_claim = Some("gitea-data".into());
        s.image = Some("registry.example.com/geo-sidecar:custom".into());
        s.forge = Some(Forge {
            embedded: None,
            upstream: None,
            container: Some(ContainerForge {
                image: "gitea/gitea:1.22".into(),
                args: vec![],
                env: vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "GITEA__server__ROOT_URL".into(),
                    value: Some("https://git.berlin.example.com".into()),
                    value_from: None,
                }],
                http_port: 3000,
                repositories_mount_path: "/data/git/repositories".into(),
                hook_token_secret: Some("gitea-hook".into()),
            }),
        });
        let mut gs = GeoSite::new("berlin", s);
        gs.metadata = meta("berlin", "uid-berlin", 1);
        gs
    }

    pub fn replicables() -> Vec<Replicable> {
        let mut repos = Replicable::new(
            "repositories",
            ReplicableSpec {
                data_type: DataType::Repository,
                source_path: "repositories".into(),
                include: vec!["**/*.git".into()],
                exclude: vec![],
                url_mapping: Some(UrlMapping {
                    prefix: String::new(),
                    case_insensitive: false,
                    append_git_suffix: true,
                    unmapped: false,
                }),
                id_template: None,
                sites: vec![],
                verification_interval: "24h".into(),
                concurrency: 4,
            },
        );
        repos.metadata = meta("repositories", "uid-repos", 1);
        let mut lfs = Replicable::new(
            "lfs-objects",
            ReplicableSpec {
                data_type: DataType::Blob,
                source_path: "lfs-objects".into(),
                include: vec!["**".into()],
                exclude: vec![],
                url_mapping: None,
                id_template: Some("{oid:0:2}/{oid:2:2}/{oid}".into()),
                sites: vec!["london".into()],
                verification_interval: "72h".into(),
                concurrency: 8,
            },
        );
        lfs.metadata = meta("lfs-objects", "uid-lfs", 1);
        vec![repos, lfs]
    }

    pub fn key(site: &str) -> SiteKey {
        SiteKey {
            kid: format!("{site}.1"),
            public_key: match site {
                "paris" => PARIS_KEY.into(),
                _ => TOKYO_KEY.into(),
            },
        }
    }

    /// Compares `value` with `golden/<name>.json`; `UPDATE_GOLDEN=1` rewrites the file.
    pub fn assert_golden(name: &str, value: &serde_json::Value) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/build/golden")
            .join(format!("{name}.json"));
        let rendered = serde_json::to_string_pretty(value).unwrap() + "\n";
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert!(
            committed == rendered,
            "{} differs from the builder's output (UPDATE_GOLDEN=1 to accept):\n{rendered}",
            path.display()
        );
    }
}
