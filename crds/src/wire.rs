//! JSON bodies shared over HTTP (DESIGN §3–§6). Field names are part of the contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Header sent on every Geo API response.
pub const GEO_API_VERSION_HEADER: &str = "geo-api-version";
/// Header with a streamed blob's SHA-256 (hex).
pub const CHECKSUM_HEADER: &str = "geo-checksum";
/// Header on accelerated responses served while the primary is unreachable: seconds since the
/// client's authorization was confirmed by the primary.
pub const STALENESS_HEADER: &str = "geo-replica-staleness";

/// `GET /api/v4/geo/proxy` (GitLab-compatible names).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    pub geo_enabled: bool,
    /// The primary's internal URL; `null` means "primary unknown".
    pub geo_proxy_url: Option<String>,
    /// Kept for GitLab compatibility; our sidecars mint their own extra data.
    #[serde(default)]
    pub geo_proxy_extra_data: Option<String>,
}

/// One catalog item.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CatalogItem {
    pub id: String,
    pub size: u64,
    /// SHA-256 hex (DESIGN §6: blob content, or the sorted ref listing of a repository).
    pub checksum: String,
    pub updated_at: DateTime<Utc>,
}

/// `GET /api/v4/geo/replicables/{replicable}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CatalogPage {
    pub replicable: String,
    pub items: Vec<CatalogItem>,
    /// Cursor for the next page; `null` at the end.
    pub next_cursor: Option<String>,
    /// Items in the catalog in all.
    #[serde(default)]
    pub total: u64,
}

/// What happened to an item.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Created,
    Updated,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Updated => "updated",
            EventKind::Deleted => "deleted",
        }
    }
}

/// One event-log entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GeoEvent {
    pub id: i64,
    pub replicable: String,
    pub item_id: String,
    pub event: EventKind,
    /// The item's checksum after the change (`null` for deletes).
    pub checksum: Option<String>,
    pub at: DateTime<Utc>,
}

/// `GET /api/v4/geo/events`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventsPage {
    /// Epoch of the log; a new value means the log was recreated: reset the cursor and backfill.
    pub log_id: String,
    pub events: Vec<GeoEvent>,
    /// Newest event id in the log (0 when empty).
    #[serde(default)]
    pub last_event_id: i64,
}

/// `410 Gone` body of `/events` when the cursor was pruned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventsGone {
    pub log_id: String,
    pub oldest_id: i64,
    pub last_event_id: i64,
}

/// `409` body of `/retrieve` when the item changed since the token was minted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChecksumConflict {
    pub current_checksum: String,
}

/// Error body used by JSON routes: `{"message": …}` plus `geo_code` where a client acts on it
/// (e.g. `FILE_NOT_FOUND`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo_code: Option<String>,
}

/// Per-replicable counts of one instance's registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ReplicableReport {
    pub replicable: String,
    /// Items in the primary's catalog (that this site selects).
    pub total: i64,
    pub synced: i64,
    pub failed: i64,
    pub pending: i64,
    #[serde(default)]
    pub started: i64,
    pub verified: i64,
    pub verification_failed: i64,
    /// Age in seconds of the oldest pending row.
    #[serde(default)]
    pub oldest_pending_seconds: i64,
    /// Why deletes are paused (the `DeletesPaused` condition), with the window id to confirm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes_paused: Option<DeletesPaused>,
}

/// A paused mass delete awaiting confirmation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeletesPaused {
    pub window_id: String,
    pub count: u64,
    pub message: String,
}

/// How far behind one repository is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ItemLag {
    pub replicable: String,
    pub item_id: String,
    pub lag_seconds: i64,
}

/// An instance's status (`POST /api/v4/geo/status`, and `GET /-/geo/status` on the admin port).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct StatusReport {
    pub site: String,
    pub instance: String,
    pub role: String,
    /// geoforge version of the instance.
    pub version: String,
    pub geo_api_version: String,
    /// The primary's log epoch this instance's cursor belongs to.
    #[serde(default)]
    pub log_id: Option<String>,
    /// Last event id processed (acknowledged to the primary).
    #[serde(default)]
    pub cursor: i64,
    /// Newest event id seen on the primary.
    #[serde(default)]
    pub last_event_id: i64,
    /// Age of the oldest unprocessed event.
    #[serde(default)]
    pub lag_seconds: i64,
    #[serde(default)]
    pub replicables: Vec<ReplicableReport>,
    /// The most lagging items.
    #[serde(default)]
    pub lagging: Vec<ItemLag>,
    /// Why replication is paused, if it is (e.g. "primary unknown").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The primary URL in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_url: Option<String>,
    pub reported_at: DateTime<Utc>,
}

/// One instance in `GET /api/v4/geo/sites`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    pub instance: String,
    pub age_seconds: i64,
    pub report: StatusReport,
}

/// One site in `GET /api/v4/geo/sites`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SiteStatus {
    pub site: String,
    pub instances: Vec<InstanceStatus>,
}

/// `GET /api/v4/geo/sites`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SitesResponse {
    pub sites: Vec<SiteStatus>,
}

/// Plain hook form accepted by `POST /api/v4/geo/hooks` besides GitLab system hooks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PlainHook {
    pub event: EventKind,
    pub replicable: String,
    pub id: String,
}

/// `POST /-/geo/confirm-deletes` on a sidecar's admin port (`admin`-scope token): confirms a
/// paused mass delete. `window_id` names the pause (from status); `replicable` narrows it.
/// The operator relays the `geoforge.dev/confirm-deletes` annotation as this body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConfirmDeletes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_id: Option<String>,
}
