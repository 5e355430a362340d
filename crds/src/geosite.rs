//! `GeoSite`: one site of a geo-replicated forge (DESIGN §7).

use crate::condition::Condition;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a site. Apply the same manifest in every cluster; the operator
/// creates workloads only for the sites it is told are local (`--local-sites`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "geoforge.dev",
    version = "v1alpha1",
    kind = "GeoSite",
    namespaced,
    shortname = "gs",
    category = "geoforge",
    status = "GeoSiteStatus",
    doc = "A site of a geo-replicated Git forge: the primary that takes writes, or a secondary that serves reads locally.",
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.externalUrl"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.publicKeys.all(k, k.kid.startsWith(self.metadata.name + '.'))")
        .message("every publicKeys[].kid must start with the site's name and a dot, e.g. <site-name>.1"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("a site's name is a DNS label: at most 63 characters")
)]
#[x_kube(
    validation = Rule::new("self.role != 'primary' || self.replicas == 1")
        .message("a primary site runs exactly one replica (its event log is a local SQLite file): set replicas: 1"),
    validation = Rule::new("self.role == 'secondary' || has(self.forge)")
        .message("a primary or disabled site fronts a forge: set forge.embedded, forge.upstream or forge.container"),
    validation = Rule::new("self.allowInsecure || (self.externalUrl.startsWith('https://') && (!has(self.internalUrl) || self.internalUrl.startsWith('https://')))")
        .message("externalUrl and internalUrl must be https:// URLs; plain http needs allowInsecure: true (tests and quickstarts only)"),
    validation = Rule::new("!has(self.forge) || !has(self.forge.upstream) || (has(self.storage.repositories.existingClaim))")
        .message("an upstream forge's repositories are its existing volume: set storage.repositories.existingClaim")
)]
#[serde(rename_all = "camelCase")]
pub struct GeoSiteSpec {
    /// `primary` takes every write; `secondary` serves reads from its replica and forwards the rest;
    /// `disabled` is a plain front of the forge with Geo off.
    #[x_kube(validation = Rule::new("self in ['primary', 'secondary', 'disabled']")
        .message("role must be one of primary, secondary or disabled"))]
    pub role: SiteRole,

    /// URL clients use for this site (Git remotes point here).
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub external_url: String,

    /// URL of this site's sidecar service port as reachable from the other sites
    /// (across clusters). A secondary proxies to, and replicates from, the primary's internal URL.
    /// Defaults to `externalUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub internal_url: Option<String>,

    /// Allow `http://` URLs. For tests and local quickstarts only.
    #[serde(default)]
    pub allow_insecure: bool,

    /// How a push sent to a secondary reaches the primary.
    #[serde(default)]
    pub push_redirect: PushRedirect,

    /// Public keys this site signs with (Ed25519, base64url of the raw 32 bytes).
    /// Empty at first: the operator generates the key pair and shows the public key in status.
    /// During rotation list both keys.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub public_keys: Vec<PublicKey>,

    /// CIDRs of proxies (the Ingress) whose `X-Forwarded-*` / `Forwarded` headers are trusted.
    /// Empty: such headers from clients are dropped.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub trusted_proxies: Vec<Cidr>,

    /// Volumes: the repository storage and the sidecar's own state.
    #[serde(default)]
    pub storage: SiteStorage,

    /// Sidecar container image. Defaults to the operator's own version of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,

    /// Sidecar instances. A primary runs exactly one.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 32))]
    pub replicas: i32,

    /// Resources of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The Git hosting application this site fronts (primary and disabled sites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<Forge>,

    /// Which items this site replicates (secondaries). Deletes are always applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selective_sync: Option<SelectiveSync>,

    /// How long a secondary keeps serving cached, authorized clients from its replica
    /// while the primary is unreachable (e.g. `5m`).
    #[serde(default = "default_max_staleness")]
    #[schemars(length(max = 32), regex(pattern = "^([0-9]+(ms|s|m|h|d))+$"))]
    pub max_staleness: String,
}

fn default_replicas() -> i32 {
    1
}

fn default_max_staleness() -> String {
    "5m".into()
}

/// A site's role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum SiteRole {
    Primary,
    #[default]
    Secondary,
    Disabled,
}

impl SiteRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteRole::Primary => "primary",
            SiteRole::Secondary => "secondary",
            SiteRole::Disabled => "disabled",
        }
    }
}

/// How pushes that reach a secondary are sent on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum PushRedirect {
    /// Proxy the push transparently (the default).
    #[default]
    Proxy,
    /// Answer `info/refs?service=git-receive-pack` with 302 to `/-/push_from_secondary/<site>/…` on this site.
    Unified,
    /// Redirect to the primary's external URL with that prefix.
    Separate,
}

/// One public key of a site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PublicKey {
    /// Key id: `<site-name>.<n>`.
    #[schemars(length(min = 3, max = 80), regex(pattern = "^[a-z0-9.-]+$"))]
    pub kid: String,
    /// Raw 32-byte Ed25519 public key, base64url without padding (43 characters).
    #[schemars(length(min = 43, max = 43), regex(pattern = "^[A-Za-z0-9_-]{43}$"))]
    pub key: String,
}

/// An IPv4 or IPv6 CIDR such as `10.0.0.0/8`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Cidr(
    #[schemars(length(max = 64), regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"))] pub String,
);

/// Storage of a site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SiteStorage {
    /// The repository volume (bare repositories and files; the forge's storage on a primary,
    /// the replica on a secondary).
    #[serde(default)]
    pub repositories: RepositoryVolume,
    /// The sidecar's own volume for SQLite (event log, catalog, registry). Always a PVC of the sidecar.
    #[serde(default)]
    pub state: StateVolume,
}

/// The repository volume: a new claim per replica, or an existing claim (an upstream forge's).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryVolume {
    /// Size of a new claim, e.g. `50Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub size: Option<String>,
    /// Storage class of a new claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class: Option<String>,
    /// Use this existing PersistentVolumeClaim instead of creating one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub existing_claim: Option<String>,
}

/// The sidecar's state volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateVolume {
    /// Size, e.g. `5Gi` (default `1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub size: Option<String>,
    /// Storage class. Must not be RWX/NFS: SQLite needs local file locking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class: Option<String>,
}

/// The forge a site fronts: exactly one variant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("[has(self.embedded), has(self.upstream), has(self.container)].filter(x, x).size() == 1")
    .message("forge: set exactly one of embedded, upstream or container"))]
#[serde(rename_all = "camelCase")]
pub struct Forge {
    /// Git's own `git http-backend` over the repository volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedForge>,
    /// An existing forge Service reached over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamForge>,
    /// A forge container run beside the sidecar in the same pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerForge>,
}

/// Settings of the embedded forge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddedForge {
    /// Secret holding an `htpasswd`-style credentials file (key `credentials`) for HTTP basic auth.
    /// Without it every request is anonymous and pushes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,
    /// Allow anonymous clone and fetch of every repository.
    #[serde(default)]
    pub anonymous_read: bool,
    /// Repositories (item ids, e.g. `group/project.git`) that allow anonymous reads.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub public_repositories: Vec<String>,
}

/// An existing forge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamForge {
    /// Base URL of the forge's HTTP service inside the cluster, e.g. `http://gitea-http:3000`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Secret with the token the forge signs its system hooks with (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub hook_token_secret: Option<String>,
}

/// A forge container in the site's pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerForge {
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// Port the forge serves HTTP on (the sidecar fronts it on localhost).
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// Where the forge mounts the repository volume.
    #[schemars(length(min = 1, max = 1024))]
    pub repositories_mount_path: String,
    /// Secret with the token the forge signs its system hooks with (key `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub hook_token_secret: Option<String>,
}

/// Per-site selective sync: items matching `include` (all when empty) and not `exclude`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SelectiveSync {
    /// Glob patterns over item ids (`group/**`).
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 512)))]
    pub include: Vec<String>,
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 512)))]
    pub exclude: Vec<String>,
}

/// Observed state of a site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct GeoSiteStatus {
    /// `Ready` (workload available), `Replicating`, `Healthy` (status reported recently).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Public keys the site's sidecars sign with now (add them to `spec.publicKeys` in the other clusters).
    #[serde(default)]
    pub public_keys: Vec<PublicKey>,
    /// When a sidecar of this site last reported status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_time: Option<DateTime<Utc>>,
}

impl GeoSiteSpec {
    /// The URL peers use for this site: `internalUrl`, else `externalUrl`.
    pub fn internal_url(&self) -> &str {
        self.internal_url.as_deref().unwrap_or(&self.external_url)
    }
}
