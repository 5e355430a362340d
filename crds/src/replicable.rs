//! `Replicable`: one kind of data replicated from the primary (DESIGN §7).

use crate::condition::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of items on the repository volume to replicate and verify: Git repositories or blobs
/// (LFS objects, uploads). Its name is the `{replicable}` of the Geo API routes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "geoforge.dev",
    version = "v1alpha1",
    kind = "Replicable",
    namespaced,
    shortname = "rep",
    category = "geoforge",
    status = "ReplicableStatus",
    doc = "Data replicated from the primary site to the secondaries: Git repositories or blobs.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Synced", type_ = "integer", json_path = ".status.summary.synced"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.summary.failed"),
    printcolumn(name = "Verified", type_ = "integer", json_path = ".status.summary.verified"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("a replicable's name is used in URLs and labels: at most 63 characters")
)]
#[x_kube(
    validation = Rule::new("self.type == 'blob' || !has(self.idTemplate)")
        .message("idTemplate maps LFS oids to blob item ids: it is only for type: blob"),
    validation = Rule::new("self.type == 'repository' || !has(self.urlMapping)")
        .message("urlMapping maps Git URLs to repositories: it is only for type: repository")
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicableSpec {
    /// `repository` (bare Git repositories, synced with `git fetch`) or `blob` (files, streamed).
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self in ['repository', 'blob']").message("type must be repository or blob"))]
    pub data_type: DataType,

    /// Directory on the repository volume holding the items, relative to the volume root.
    #[schemars(length(max = 1024), regex(pattern = r"^([^/].*)?$"))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(s, s == '..')")
        .message("sourcePath must stay inside the repository volume: no '..' segments"))]
    #[serde(default)]
    pub source_path: String,

    /// Glob patterns, relative to `sourcePath`, selecting the items (`**/*.git` for repositories).
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[x_kube(validation = Rule::new("size(self) > 0 && self.all(p, size(p) > 0 && size(p) <= 512)")
        .message("include needs at least one non-empty pattern (e.g. '**/*.git' or '**'), each at most 512 characters"))]
    pub include: Vec<String>,

    /// Glob patterns excluded from `include`.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 512)))]
    pub exclude: Vec<String>,

    /// How client URL paths map to repository items (type `repository`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_mapping: Option<UrlMapping>,

    /// Maps an LFS oid to a blob item id (type `blob`), with placeholders `{oid}` and
    /// `{oid:START:LEN}`, e.g. `{oid:0:2}/{oid:2:2}/{oid}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new(r"self.matches('^([^{}]|\\{oid(:[0-9]{1,2}:[0-9]{1,2})?\\})+$')")
        .message("idTemplate may only use the placeholders {oid} and {oid:START:LEN}"))]
    pub id_template: Option<String>,

    /// Sites this applies to; empty means every secondary.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub sites: Vec<String>,

    /// How often synced items are re-verified, e.g. `24h`.
    #[serde(default = "default_verification_interval")]
    #[schemars(length(max = 32), regex(pattern = "^([0-9]+(ms|s|m|h|d))+$"))]
    pub verification_interval: String,

    /// Concurrent sync transfers per secondary instance. Small blobs that are received and
    /// checked wait for their durability barrier outside this limit (bounded by memory).
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: i32,
}

fn default_verification_interval() -> String {
    "24h".into()
}

fn default_concurrency() -> i32 {
    4
}

/// Data type of a replicable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Repository,
    Blob,
}

impl DataType {
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Repository => "repository",
            DataType::Blob => "blob",
        }
    }
}

/// URL path ↔ repository item id mapping (DESIGN §3).
///
/// The item id is the path after the forge root, less `prefix`; `/group/project.git` maps to
/// item `group/project.git`. A path without the `.git` suffix maps to the item with it when
/// `appendGitSuffix` is set (Git clients omit it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct UrlMapping {
    /// URL path prefix before the repository path, e.g. `/git`.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub prefix: String,
    /// Fold the URL path to lower case before mapping (forges with case-insensitive paths).
    #[serde(default)]
    pub case_insensitive: bool,
    /// Add `.git` to a path that lacks it.
    #[serde(default = "yes")]
    pub append_git_suffix: bool,
    /// The layout cannot be mapped from a URL (e.g. GitLab hashed storage): proxy only.
    #[serde(default)]
    pub unmapped: bool,
}

fn yes() -> bool {
    true
}

/// Observed replication state, written by the operator from the sidecars' status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicableStatus {
    /// One entry per secondary site.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["site"]))]
    pub sites: Vec<SiteReplication>,
    /// Totals over the sites (the printer columns read these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ReplicationCounts>,
    /// `Synced`, `Verified`, `Ready`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Counts of one site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SiteReplication {
    pub site: String,
    #[serde(flatten)]
    pub counts: ReplicationCounts,
    #[serde(default)]
    pub last_event_id: i64,
    #[serde(default)]
    pub lag_seconds: i64,
}

/// Item counts by state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationCounts {
    #[serde(default)]
    pub total: i64,
    #[serde(default)]
    pub synced: i64,
    #[serde(default)]
    pub failed: i64,
    #[serde(default)]
    pub pending: i64,
    #[serde(default)]
    pub verified: i64,
    #[serde(default)]
    pub verification_failed: i64,
}

impl ReplicableSpec {
    /// Whether this replicable applies to `site` (empty `sites`: every secondary).
    pub fn applies_to(&self, site: &str) -> bool {
        self.sites.is_empty() || self.sites.iter().any(|s| s == site)
    }
}
