//! The site's StatefulSet: the sidecar (and, for `forge.container`, the forge beside it), one
//! state PVC per replica, the repository volume, probes on the admin port, a restricted
//! security context for the sidecar, and the config checksum that rolls the pods on a change.

use super::configmap::PRIVATE_KEY_FILE;
use super::{
    ADMIN_PORT, CONFIG_CHECKSUM_ANNOTATION, Defaults, SERVICE_PORT, configmap_name,
    headless_service_name, key_secret_name, labels, owned_meta, paths, selector_labels,
    statefulset_name,
};
use geoforge_crds::GeoSite;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// UID/GID the sidecar runs as (the distroless `nonroot` user).
pub const SIDECAR_UID: i64 = 65532;
const DEFAULT_STATE_SIZE: &str = "1Gi";
const DEFAULT_REPOSITORIES_SIZE: &str = "10Gi";

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn claim_template(
    site: &str,
    name: &str,
    size: &str,
    class: Option<&String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(site)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.cloned(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.into()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

fn secret_volume(name: &str, secret: &str, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            // Group-readable for fsGroup, never world-readable (the sidecar checks the world bits).
            default_mode: Some(0o440),
            items,
            optional: None,
        }),
        ..Volume::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The StatefulSet of a local site. `config_checksum` is [`super::configmap::checksum`] of the
/// rendered config.
pub fn statefulset(site: &GeoSite, defaults: &Defaults, config_checksum: &str) -> StatefulSet {
    let name = site.name_any();
    let spec = &site.spec;
    let storage = &spec.storage;
    let forge = spec.forge.as_ref();

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: configmap_name(&name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        secret_volume(
            "keys",
            &key_secret_name(&name),
            Some(vec![KeyToPath {
                key: PRIVATE_KEY_FILE.into(),
                path: PRIVATE_KEY_FILE.into(),
                mode: None,
            }]),
        ),
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", paths::CONFIG_DIR, true),
        mount("keys", paths::KEYS_DIR, true),
        mount("state", paths::STATE_DIR, false),
        mount("repositories", paths::REPOSITORIES_DIR, false),
        mount("tmp", paths::TMP_DIR, false),
    ];
    let mut claims = vec![claim_template(
        &name,
        "state",
        storage.state.size.as_deref().unwrap_or(DEFAULT_STATE_SIZE),
        storage.state.storage_class.as_ref(),
    )];
    match &storage.repositories.existing_claim {
        Some(claim) => volumes.push(Volume {
            name: "repositories".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Volume::default()
        }),
        None => claims.push(claim_template(
            &name,
            "repositories",
            storage
                .repositories
                .size
                .as_deref()
                .unwrap_or(DEFAULT_REPOSITORIES_SIZE),
            storage.repositories.storage_class.as_ref(),
        )),
    }
    if let Some(secret) = forge
        .and_then(|f| f.embedded.as_ref())
        .and_then(|e| e.credentials_secret.as_ref())
    {
        volumes.push(secret_volume(
            "forge-credentials",
            secret,
            Some(vec![KeyToPath {
                key: "credentials".into(),
                path: "credentials".into(),
                mode: None,
            }]),
        ));
        mounts.push(mount(
            "forge-credentials",
            paths::FORGE_CREDENTIALS_DIR,
            true,
        ));
    }
    let hook_secret = forge.and_then(|f| {
        f.upstream
            .as_ref()
            .and_then(|u| u.hook_token_secret.clone())
            .or_else(|| {
                f.container
                    .as_ref()
                    .and_then(|c| c.hook_token_secret.clone())
            })
    });
    if let Some(secret) = &hook_secret {
        volumes.push(secret_volume(
            "hook-token",
            secret,
            Some(vec![KeyToPath {
                key: "token".into(),
                path: "token".into(),
                mode: None,
            }]),
        ));
        mounts.push(mount("hook-token", paths::HOOK_TOKEN_DIR, true));
    }

    let sidecar = Container {
        name: "sidecar".into(),
        image: Some(spec.image.clone().unwrap_or(defaults.sidecar_image.clone())),
        // The geoforge image carries several binaries and sets no entrypoint: name the sidecar.
        command: Some(vec!["geo-sidecar".into()]),
        args: Some(vec![
            "run".into(),
            "--config".into(),
            paths::CONFIG_FILE.into(),
        ]),
        env: Some(vec![EnvVar {
            name: "GEO_INSTANCE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: SERVICE_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/-/liveness", 10, 6)),
        readiness_probe: Some(probe("/-/readiness", 5, 3)),
        startup_probe: Some(probe("/-/liveness", 5, 60)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut containers = vec![sidecar];
    // The forge image is the user's: its user and file system are its own business, so it gets
    // no security context from us (a GitLab or Gitea image may need to write its root fs).
    if let Some(c) = forge.and_then(|f| f.container.as_ref()) {
        containers.push(Container {
            name: "forge".into(),
            image: Some(c.image.clone()),
            args: (!c.args.is_empty()).then(|| c.args.clone()),
            env: (!c.env.is_empty()).then(|| c.env.clone()),
            ports: Some(vec![ContainerPort {
                name: Some("forge-http".into()),
                container_port: c.http_port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            volume_mounts: Some(vec![mount(
                "repositories",
                &c.repositories_mount_path,
                false,
            )]),
            ..Container::default()
        });
    }

    let mut pod_labels = labels(&name);
    pod_labels.insert("geoforge.dev/role".into(), spec.role.as_str().to_string());
    StatefulSet {
        metadata: owned_meta(site, statefulset_name(&name)),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                match_expressions: None,
            },
            service_name: Some(headless_service_name(&name)),
            pod_management_policy: Some("Parallel".into()),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            volume_claim_templates: Some(claims),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_CHECKSUM_ANNOTATION.to_string(),
                        config_checksum.to_string(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(SIDECAR_UID),
                        fs_group_change_policy: Some("OnRootMismatch".into()),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    // The sidecar drains for 25 s on SIGTERM (proxy.shutdownGrace).
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;

    const SUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn golden_statefulset_primary_embedded() {
        let s = statefulset(&paris(), &defaults(), SUM);
        assert_golden("statefulset-paris", &serde_json::to_value(&s).unwrap());
    }

    #[test]
    fn golden_statefulset_secondary() {
        let s = statefulset(&tokyo(), &defaults(), SUM);
        assert_golden("statefulset-tokyo", &serde_json::to_value(&s).unwrap());
    }

    #[test]
    fn golden_statefulset_container_forge_existing_claim() {
        let s = statefulset(&berlin_container(), &defaults(), SUM);
        assert_golden("statefulset-berlin", &serde_json::to_value(&s).unwrap());
    }

    #[test]
    fn statefulset_essentials() {
        let s = statefulset(&tokyo(), &defaults(), "abc");
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let policy = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .unwrap();
        assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
        assert_eq!(policy.when_scaled.as_deref(), Some("Retain"));
        let claims: Vec<_> = spec
            .volume_claim_templates
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(claims, ["state", "repositories"]);
        let tpl = &spec.template;
        assert_eq!(
            tpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
                [CONFIG_CHECKSUM_ANNOTATION],
            "abc"
        );
        let pod = tpl.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.command.as_deref(), Some(&["geo-sidecar".to_string()][..]));
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "run --config /etc/geoforge/config/sidecar.yaml"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/-/liveness"));
        assert_eq!(live.port, IntOrString::String("admin".into()));
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/-/readiness"));
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
    }

    #[test]
    fn container_forge_and_existing_claim() {
        let s = statefulset(&berlin_container(), &defaults(), SUM);
        let spec = s.spec.unwrap();
        let claims: Vec<_> = spec
            .volume_claim_templates
            .unwrap()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(claims, ["state"], "the existing claim is not templated");
        let pod = spec.template.spec.unwrap();
        let repo = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "repositories")
            .unwrap();
        assert_eq!(
            repo.persistent_volume_claim.unwrap().claim_name,
            "gitea-data"
        );
        assert_eq!(pod.containers.len(), 2);
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example.com/geo-sidecar:custom")
        );
        let forge = &pod.containers[1];
        assert_eq!(forge.image.as_deref(), Some("gitea/gitea:1.22"));
        assert_eq!(
            forge.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/data/git/repositories"
        );
    }
}
