//! geoforge API types shared by the operator and the sidecar.
//!
//! - [`geosite`] and [`replicable`]: the `geoforge.dev/v1alpha1` custom resources;
//! - [`config`]: the sidecar's configuration file (the operator renders it, the sidecar parses it);
//! - [`wire`]: JSON bodies of the Geo API and the proxy-config API (DESIGN §3–§6);
//! - [`auth`]: GL-Geo tokens (DESIGN §5), minted and verified the same way by every part;
//! - [`duration`]: the `10s` / `5m` / `24h` strings used in specs and config.

pub mod auth;
pub mod condition;
pub mod config;
pub mod duration;
pub mod geosite;
pub mod replicable;
pub mod wire;

pub use condition::Condition;
pub use geosite::{GeoSite, GeoSiteSpec, GeoSiteStatus};
pub use replicable::{Replicable, ReplicableSpec, ReplicableStatus};

/// API group of every geoforge resource.
pub const GROUP: &str = "geoforge.dev";
/// API version of the custom resources.
pub const VERSION: &str = "v1alpha1";
/// Version of the Geo HTTP API, sent as `Geo-Api-Version` on every Geo API response.
/// A secondary refuses to sync from another major version.
pub const GEO_API_VERSION: &str = "1.0";
/// Annotation a person sets to confirm a paused mass delete (value: the window id).
pub const CONFIRM_DELETES_ANNOTATION: &str = "geoforge.dev/confirm-deletes";

/// The major part of a `Geo-Api-Version` value, if it parses.
pub fn api_major(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

/// The generated CRD manifests, as committed under `crds/` (file name, YAML).
///
/// Regenerate with `cargo run -p geo-operator --bin crdgen`; a test fails when the committed
/// files drift from the types.
pub fn crd_manifests() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let header = "# Generated from the geoforge-crds types by `cargo run -p geo-operator --bin crdgen`. Do not edit.\n";
    vec![
        (
            "geosite.yaml",
            format!(
                "{header}{}",
                serde_saphyr::to_string(&GeoSite::crd()).expect("CRD serializes")
            ),
        ),
        (
            "replicable.yaml",
            format!(
                "{header}{}",
                serde_saphyr::to_string(&Replicable::crd()).expect("CRD serializes")
            ),
        ),
    ]
}
