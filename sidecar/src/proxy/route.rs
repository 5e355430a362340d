//! The service port's route table: which backend serves a request. One function, read top
//! to bottom; the phases around it live in [`crate::proxy::front`].
//!
//! | role | request | target |
//! |---|---|---|
//! | primary | `/api/v4/geo` and below | [`Target::GeoApi`] (in-process Geo API) |
//! | primary, disabled | everything else | [`Target::Forge`] (embedded `git http-backend` or `forge.upstreamUrl`) |
//! | secondary | primary known | [`Target::Primary`], through the read accelerator |
//! | secondary | primary unknown | [`Target::Unavailable`] (503), through the read accelerator |
//!
//! On a secondary both targets pass through [`crate::accel::Accelerator`], which answers from
//! the replica what it can prove fresh and authorized (Git fetches, LFS downloads; its own
//! table is in [`crate::accel`]) and hands everything else back to be proxied or refused.

use geoforge_crds::geosite::SiteRole;
use http::request::Parts;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<P> {
    /// The primary's Geo API, served in-process.
    GeoApi,
    /// The forge this site fronts.
    Forge,
    /// Streamed to the primary (`P`: its internal URL, or what the caller digested it into).
    Primary(P),
    /// The primary is unknown: 503 with `Retry-After`.
    Unavailable,
}

impl<P> Target<P> {
    /// The `target` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Target::GeoApi => "local",
            Target::Forge => "forge",
            Target::Primary(_) | Target::Unavailable => "primary",
        }
    }
}

/// Whether a path is the primary's Geo API.
pub fn is_geo_api(path: &str) -> bool {
    path == "/api/v4/geo" || path.starts_with("/api/v4/geo/")
}

/// The route table.
pub fn pick_target<P>(role: SiteRole, req: &Parts, primary: Option<P>) -> Target<P> {
    match role {
        SiteRole::Primary if is_geo_api(req.uri.path()) => Target::GeoApi,
        SiteRole::Primary | SiteRole::Disabled => Target::Forge,
        SiteRole::Secondary => match primary {
            Some(p) => Target::Primary(p),
            None => Target::Unavailable,
        },
    }
}

/// A low-cardinality name of the route, for the `route` metric label and logs.
pub fn route_label(path: &str, query: Option<&str>) -> &'static str {
    if is_geo_api(path) {
        return "geo_api";
    }
    if path.ends_with("/info/refs") {
        return match query {
            Some(q) if q.contains("service=git-receive-pack") => "git_info_refs_receive_pack",
            _ => "git_info_refs",
        };
    }
    if path.ends_with("/git-upload-pack") {
        return "git_upload_pack";
    }
    if path.ends_with("/git-receive-pack") {
        return "git_receive_pack";
    }
    if path.contains("/info/lfs/") {
        return "lfs";
    }
    if path.starts_with("/-/push_from_secondary/") || path.starts_with("/-/from_secondary/") {
        return "push_from_secondary";
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(path: &str) -> Parts {
        http::Request::get(path).body(()).unwrap().into_parts().0
    }

    #[test]
    fn table() {
        let p = parts("/api/v4/geo/events");
        let none = None::<&str>;
        assert_eq!(pick_target(SiteRole::Primary, &p, none), Target::GeoApi);
        let p = parts("/api/v4/geology");
        assert_eq!(pick_target(SiteRole::Primary, &p, none), Target::Forge);
        let p = parts("/g/p.git/info/refs");
        assert_eq!(pick_target(SiteRole::Disabled, &p, none), Target::Forge);
        assert_eq!(
            pick_target(SiteRole::Secondary, &p, Some("http://p")),
            Target::Primary("http://p")
        );
        assert_eq!(
            pick_target(SiteRole::Secondary, &p, none),
            Target::Unavailable
        );
        assert_eq!(
            route_label("/g/p.git/git-upload-pack", None),
            "git_upload_pack"
        );
    }
}
