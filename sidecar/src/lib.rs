//! geo-sidecar: the data plane of a geoforge site.
//!
//! One binary, role from the config: on a **primary** it fronts the forge and serves the Geo API;
//! on a **secondary** it is the site's Workhorse (local reads, proxying, replication, registry).
//!
//! Module ownership (one concern each):
//! - [`settings`]: config file + overrides + key files → [`settings::Settings`]
//! - [`app`]: listeners, the service-port route table, graceful shutdown
//! - [`proxy`]: ingress header hygiene, upstream client, primary discovery, 503s
//! - [`forge`]: the embedded forge (`git http-backend` CGI), basic auth, push detection
//! - [`primary`]: catalog, event log, Geo API routes
//! - [`secondary`]: registry, replication workers, verification, status reports
//! - shared helpers: [`items`] (item ids and URL mapping), [`checksum`], [`metrics`], [`http_util`], [`git`]

pub mod accel;
pub mod app;
pub mod checksum;
pub mod context;
pub mod forge;
pub mod git;
pub mod http_util;
pub mod items;
pub mod metrics;
pub mod primary;
pub mod proxy;
pub mod secondary;
pub mod settings;

/// geoforge version, reported in status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
