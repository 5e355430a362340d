//! The sidecar's configuration file (YAML).
//!
//! The operator renders this type into a ConfigMap and the sidecar parses the same type, so
//! what one writes the other reads. Unknown fields are errors (a typo must not silently fall
//! back to a default). Secrets are referenced by file path, never inline: private keys,
//! HS256 secrets, the hook token and the credentials file are all files (in Kubernetes,
//! mounted Secrets).

use crate::geosite::{PushRedirect, SiteRole};
use crate::replicable::{DataType, UrlMapping};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use crate::duration::serde_str as dur;

/// Root of the sidecar config file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// This site's id (the `GeoSite` name, a DNS label).
    pub site_id: String,
    pub role: SiteRole,
    /// This instance's name (the pod name); defaults to the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// URL clients use for this site (Location rewriting, LFS hrefs, push redirects).
    pub external_url: String,
    /// The primary's external URL (`pushRedirect: separate`). Standalone: set here; in
    /// Kubernetes the operator renders it from the primary `GeoSite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_external_url: Option<String>,
    /// Allow `http://` cross-site URLs (tests and quickstart only).
    #[serde(default)]
    pub allow_insecure: bool,
    #[serde(default)]
    pub listen: Listen,
    /// Directory for this instance's SQLite files (event log, catalog, registry).
    pub state_dir: PathBuf,
    /// Root of the repository volume; replicables' `sourcePath`s are relative to it.
    pub storage_root: PathBuf,
    /// Where a secondary learns the primary URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<PrimaryDiscovery>,
    pub keys: Keys,
    /// CIDRs whose `X-Forwarded-*` / `Forwarded` headers are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub push_redirect: PushRedirect,
    /// Forge fronted by a primary or disabled site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<ForgeConfig>,
    /// What is replicated.
    #[serde(default)]
    pub replicables: Vec<ReplicableConfig>,
    /// Per-site selective sync (secondaries).
    #[serde(default)]
    pub selective_sync: SelectiveSyncConfig,
    /// How long cached authorizations serve reads while the primary is unreachable.
    #[serde(default = "default_max_staleness", with = "dur")]
    pub max_staleness: Duration,
    #[serde(default)]
    pub proxy: ProxyTuning,
    #[serde(default)]
    pub geo: GeoTuning,
    #[serde(default)]
    pub acceleration: AccelerationTuning,
    #[serde(default)]
    pub log: LogConfig,
}

fn default_max_staleness() -> Duration {
    Duration::from_secs(300)
}

/// Listen addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Client traffic and the Geo API.
    #[serde(default = "default_service_addr")]
    pub service: String,
    /// Health, metrics, own status; never exposed outside the cluster.
    #[serde(default = "default_admin_addr")]
    pub admin: String,
}

fn default_service_addr() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin_addr() -> String {
    "0.0.0.0:8081".into()
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            service: default_service_addr(),
            admin: default_admin_addr(),
        }
    }
}

/// Where a secondary gets the primary's internal URL: polled from the internal API
/// (the operator), or a static URL (standalone).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrimaryDiscovery {
    /// Base URL of the internal API serving `GET /api/v4/geo/proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_api: Option<String>,
    /// Standalone: the primary's internal URL, used instead of polling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_url: Option<String>,
    /// Poll interval (jittered by up to 20%).
    #[serde(default = "default_poll", with = "dur")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(10)
}

/// Keys: this site's signing key and the keys it trusts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Keys {
    /// Key id of the signing key (`<site-id>.<n>`).
    pub kid: String,
    /// PKCS#8 PEM file with this site's Ed25519 private key (mode 0600 or stricter on the world bits).
    pub private_key_file: PathBuf,
    /// Keys of this and other sites that are trusted to sign tokens.
    #[serde(default)]
    pub trusted: Vec<TrustedKey>,
    /// Longest accepted token validity (`exp - iat`); DESIGN §5 caps it at 60 s.
    #[serde(default = "default_max_validity", with = "dur")]
    pub max_token_validity: Duration,
}

fn default_max_validity() -> Duration {
    Duration::from_secs(60)
}

/// A trusted key. The algorithm comes from here, never from a token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedKey {
    pub kid: String,
    /// The site the key belongs to (the `kid` prefix before the first dot when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default)]
    pub algorithm: KeyAlgorithm,
    /// EdDSA: base64url raw public key (public, so inline is fine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// HS256: file with the shared secret (GitLab compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

impl TrustedKey {
    /// The site that owns this key.
    pub fn site(&self) -> &str {
        self.site
            .as_deref()
            .unwrap_or_else(|| self.kid.split('.').next().unwrap_or(&self.kid))
    }
}

/// Token algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    #[default]
    EdDSA,
    HS256,
}

/// The forge a primary (or disabled site) fronts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForgeConfig {
    /// `git http-backend` over `storage_root` (or `repositoriesDir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedForgeConfig>,
    /// URL of an HTTP forge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_url: Option<String>,
    /// File with the token forge system hooks carry (`X-Gitlab-Token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_token_file: Option<PathBuf>,
}

/// Embedded forge settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedForgeConfig {
    /// Directory of bare repositories (default: `storage_root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repositories_dir: Option<PathBuf>,
    /// `user:hash` lines (`$sha256$<salt>$<hex>` hashes, see `geo-sidecar hash-password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Anonymous clone/fetch of every repository.
    #[serde(default)]
    pub anonymous_read: bool,
    /// Repositories (relative paths) that allow anonymous reads.
    #[serde(default)]
    pub public_repositories: Vec<String>,
    /// The `git` binary (default: `git` on PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_binary: Option<PathBuf>,
}

/// A replicable as the sidecar sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicableConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Relative to `storage_root`.
    #[serde(default)]
    pub source_path: String,
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_mapping: Option<UrlMapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_template: Option<String>,
    #[serde(default = "default_verification_interval", with = "dur")]
    pub verification_interval: Duration,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

fn default_verification_interval() -> Duration {
    Duration::from_secs(86_400)
}
fn default_concurrency() -> u32 {
    4
}

/// Selective sync patterns over item ids.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectiveSyncConfig {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Proxy limits and timeouts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyTuning {
    #[serde(default = "d_connect", with = "dur")]
    pub connect_timeout: Duration,
    /// Time allowed for a client, or the upstream, to send its response/request head. On the
    /// service port it also bounds how long an idle HTTP/1.1 keep-alive connection waits for
    /// its next request (HTTP/2 connections are kept in check with keep-alive pings).
    #[serde(default = "d_header_read", with = "dur")]
    pub header_read_timeout: Duration,
    /// Idle pooled upstream connections are closed after this (keep it below the upstream's keep-alive).
    #[serde(default = "d_pool_idle", with = "dur")]
    pub pool_idle_timeout: Duration,
    /// Largest request head accepted (→ 431 above).
    #[serde(default = "d_max_header")]
    pub max_header_bytes: usize,
    /// Concurrent client connections per port.
    #[serde(default = "d_max_conns")]
    pub max_connections: usize,
    /// Time to drain in-flight requests on SIGTERM.
    #[serde(default = "d_drain", with = "dur")]
    pub shutdown_grace: Duration,
    /// Threads serving service-port connections (0: one per available CPU). Each connection
    /// stays on one thread with its upstream connection pool.
    #[serde(default)]
    pub io_threads: usize,
    /// How often an I/O thread that runs out of work offers its CPU (`sched_yield`) before it
    /// sleeps: on every Nth time (0: never, 1: every time). Yielding lets the clients and the
    /// upstream sharing the node's CPUs run first, which cuts the p99 on a busy node; yielding
    /// every time also hands them their work in smaller batches, which costs requests/s. Every
    /// fourth time kept most of both (BENCHMARKS.md, seventh round); on a node where the
    /// sidecar has CPUs to itself the setting hardly matters.
    #[serde(default = "d_yield_every")]
    pub yield_every: u32,
}

fn d_connect() -> Duration {
    Duration::from_secs(5)
}
fn d_header_read() -> Duration {
    Duration::from_secs(30)
}
/// Below the 30 s our own sidecars (and most forges) keep an idle connection open, so a
/// pooled connection is never reused just as the server closes it.
fn d_pool_idle() -> Duration {
    Duration::from_secs(20)
}
fn d_max_header() -> usize {
    64 * 1024
}
fn d_max_conns() -> usize {
    4096
}
fn d_yield_every() -> u32 {
    4
}
fn d_drain() -> Duration {
    Duration::from_secs(25)
}

impl Default for ProxyTuning {
    fn default() -> Self {
        ProxyTuning {
            connect_timeout: d_connect(),
            header_read_timeout: d_header_read(),
            pool_idle_timeout: d_pool_idle(),
            max_header_bytes: d_max_header(),
            max_connections: d_max_conns(),
            shutdown_grace: d_drain(),
            io_threads: 0,
            yield_every: d_yield_every(),
        }
    }
}

/// Geo API and replication tuning.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeoTuning {
    /// Primary: how often storage is rescanned for changes made outside the sidecar.
    #[serde(default = "d_rescan", with = "dur")]
    pub rescan_interval: Duration,
    /// Primary: events older than this are pruned even if a secondary has not acknowledged them.
    #[serde(default = "d_retention", with = "dur")]
    pub event_retention: Duration,
    /// Longest `wait` of an events long-poll.
    #[serde(default = "d_max_wait", with = "dur")]
    pub max_long_poll: Duration,
    /// Secondary: status report interval.
    #[serde(default = "d_status", with = "dur")]
    pub status_interval: Duration,
    /// Secondary: consistency pass (catalog backfill) interval.
    #[serde(default = "d_backfill", with = "dur")]
    pub backfill_interval: Duration,
    /// Secondary: a row `started` for longer than this is failed ("sync timed out").
    #[serde(default = "d_stuck", with = "dur")]
    pub sync_timeout: Duration,
    /// Delete guard: deletes within `deleteWindow` above max(`deleteRatio`·items, `deleteMin`) pause.
    #[serde(default = "d_delete_window", with = "dur")]
    pub delete_window: Duration,
    #[serde(default = "d_delete_min")]
    pub delete_min: u64,
    #[serde(default = "d_delete_pct")]
    pub delete_percent: u64,
}

fn d_rescan() -> Duration {
    Duration::from_secs(300)
}
fn d_retention() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn d_max_wait() -> Duration {
    Duration::from_secs(30)
}
fn d_status() -> Duration {
    Duration::from_secs(30)
}
fn d_backfill() -> Duration {
    Duration::from_secs(3600)
}
fn d_stuck() -> Duration {
    Duration::from_secs(3600)
}
fn d_delete_window() -> Duration {
    Duration::from_secs(600)
}
fn d_delete_min() -> u64 {
    50
}
fn d_delete_pct() -> u64 {
    10
}

impl Default for GeoTuning {
    fn default() -> Self {
        GeoTuning {
            rescan_interval: d_rescan(),
            event_retention: d_retention(),
            max_long_poll: d_max_wait(),
            status_interval: d_status(),
            backfill_interval: d_backfill(),
            sync_timeout: d_stuck(),
            delete_window: d_delete_window(),
            delete_min: d_delete_min(),
            delete_percent: d_delete_pct(),
        }
    }
}

/// Secondary read acceleration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccelerationTuning {
    /// Serve authorized, fresh fetches from the replica.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Lifetime of an authorization entry while the primary is reachable.
    #[serde(default = "d_auth_ttl", with = "dur")]
    pub authorization_ttl: Duration,
    /// Extra credential-bearing headers to key authorization entries on.
    #[serde(default)]
    pub credential_headers: Vec<String>,
    /// Largest upload-pack request body read to check the wants (larger: proxied).
    #[serde(default = "d_peek")]
    pub max_request_peek_bytes: usize,
    /// Concurrent local `git upload-pack` processes (more wait in a queue).
    #[serde(default = "d_upload_packs")]
    pub max_upload_packs: usize,
}

fn yes() -> bool {
    true
}
fn d_auth_ttl() -> Duration {
    Duration::from_secs(60)
}
fn d_peek() -> usize {
    1024 * 1024
}
fn d_upload_packs() -> usize {
    8
}

impl Default for AccelerationTuning {
    fn default() -> Self {
        AccelerationTuning {
            enabled: true,
            authorization_ttl: d_auth_ttl(),
            credential_headers: vec![],
            max_request_peek_bytes: d_peek(),
            max_upload_packs: d_upload_packs(),
        }
    }
}

/// Logging.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `geo_sidecar=debug,info`.
    #[serde(default = "d_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

fn d_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: d_level(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A problem in a config file, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl SidecarConfig {
    /// Parses YAML and checks the values that serde cannot (URLs, role-specific requirements).
    /// `file` is only used in messages.
    pub fn from_yaml(text: &str, file: &str) -> Result<SidecarConfig, ConfigError> {
        let cfg: SidecarConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: one_line(&e.to_string()),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Renders as YAML (what the operator writes into the ConfigMap).
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("config serializes")
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        if !is_dns_label(&self.site_id) {
            return Err(bad(
                "siteId",
                format!(
                    "{:?} is not a DNS label (a-z, 0-9, '-', at most 63)",
                    self.site_id
                ),
            ));
        }
        check_url(&self.external_url, self.allow_insecure).map_err(|m| bad("externalUrl", m))?;
        if let Some(u) = &self.primary_external_url {
            check_url(u, self.allow_insecure).map_err(|m| bad("primaryExternalUrl", m))?;
        }
        if !self.keys.kid.starts_with(&format!("{}.", self.site_id)) {
            return Err(bad(
                "keys.kid",
                format!(
                    "{:?} must start with the site id and a dot ({}.1)",
                    self.keys.kid, self.site_id
                ),
            ));
        }
        for (i, k) in self.keys.trusted.iter().enumerate() {
            match k.algorithm {
                KeyAlgorithm::EdDSA if k.public_key.is_none() => {
                    return Err(bad(
                        &format!("keys.trusted[{i}].publicKey"),
                        "an EdDSA key needs publicKey".into(),
                    ));
                }
                KeyAlgorithm::HS256 if k.secret_file.is_none() => {
                    return Err(bad(
                        &format!("keys.trusted[{i}].secretFile"),
                        "an HS256 key needs secretFile".into(),
                    ));
                }
                _ => {}
            }
            if let Some(pk) = &k.public_key
                && crate::auth::decode_public_key(pk).is_err()
            {
                return Err(bad(
                    &format!("keys.trusted[{i}].publicKey"),
                    "not a 43-character base64url Ed25519 key".into(),
                ));
            }
        }
        if self.keys.max_token_validity > Duration::from_secs(60) {
            return Err(bad(
                "keys.maxTokenValidity",
                "at most 60s (DESIGN §5)".into(),
            ));
        }
        match self.role {
            SiteRole::Secondary => {
                let p = self.primary.as_ref().ok_or_else(|| {
                    bad("primary", "a secondary needs primary.internalApi (Kubernetes) or primary.staticUrl (standalone)".into())
                })?;
                if p.internal_api.is_none() && p.static_url.is_none() {
                    return Err(bad(
                        "primary",
                        "set primary.internalApi or primary.staticUrl".into(),
                    ));
                }
                if let Some(u) = &p.static_url {
                    check_url(u, self.allow_insecure).map_err(|m| bad("primary.staticUrl", m))?;
                }
                if let Some(u) = &p.internal_api {
                    // The internal API is in-cluster (the operator's Service): http is normal there.
                    check_url(u, true).map_err(|m| bad("primary.internalApi", m))?;
                }
            }
            SiteRole::Primary | SiteRole::Disabled => {
                let f = self.forge.as_ref().ok_or_else(|| {
                    bad(
                        "forge",
                        "a primary or disabled site needs a forge (embedded or upstreamUrl)".into(),
                    )
                })?;
                if f.embedded.is_some() == f.upstream_url.is_some() {
                    return Err(bad(
                        "forge",
                        "set exactly one of forge.embedded and forge.upstreamUrl".into(),
                    ));
                }
                if let Some(u) = &f.upstream_url {
                    check_url(u, true).map_err(|m| bad("forge.upstreamUrl", m))?;
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.replicables.iter().enumerate() {
            if !is_dns_label(&r.name) {
                return Err(bad(
                    &format!("replicables[{i}].name"),
                    format!("{:?} is not a DNS label", r.name),
                ));
            }
            if !names.insert(&r.name) {
                return Err(bad(
                    &format!("replicables[{i}].name"),
                    format!("{:?} is listed twice", r.name),
                ));
            }
            if r.include.is_empty() || r.include.iter().any(|p| p.is_empty()) {
                return Err(bad(
                    &format!("replicables[{i}].include"),
                    "needs at least one non-empty pattern".into(),
                ));
            }
            if r.source_path.starts_with('/') || r.source_path.split('/').any(|s| s == "..") {
                return Err(bad(
                    &format!("replicables[{i}].sourcePath"),
                    "must be relative to storageRoot, without '..'".into(),
                ));
            }
            if r.concurrency == 0 {
                return Err(bad(
                    &format!("replicables[{i}].concurrency"),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }

    /// This instance's name: `instance`, else the host name.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|s| s.trim().to_string())
                })
                .unwrap_or_else(|| "sidecar".into())
        })
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A DNS label: lower-case alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks a cross-site URL: `https`, or `http` when `allow_insecure`.
pub fn check_url(u: &str, allow_insecure: bool) -> Result<(), String> {
    let rest = if let Some(r) = u.strip_prefix("https://") {
        r
    } else if let Some(r) = u.strip_prefix("http://") {
        if !allow_insecure {
            return Err(format!(
                "{u:?} is plain http: use https, or set allowInsecure: true for tests"
            ));
        }
        r
    } else {
        return Err(format!("{u:?} is not an http(s) URL"));
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(format!("{u:?} has no host"));
    }
    Ok(())
}
