//! `kubectl geo`: a kubectl plugin for geoforge.
//!
//! - `kubectl geo status`: sites and, per replicable × site, item counts, lag and conditions;
//! - `kubectl geo promote SITE`: preflight (is the target caught up?), then switch the roles on
//!   the `GeoSite`s (old primary → secondary, target → primary);
//! - `kubectl geo keygen`: a new Ed25519 key pair, or a key Secret manifest for a site;
//! - `kubectl geo export-site SITE`: the `GeoSite` manifest with the public keys in use, to
//!   apply in the other clusters.
//!
//! Everything that decides or renders is a pure function in [`status`], [`promote`],
//! [`export`] and [`keygen`]; [`cli`] only fetches objects and applies patches.

pub mod cli;
pub mod export;
pub mod keygen;
pub mod promote;
pub mod status;
mod table;

/// Formats a duration in seconds the way kubectl prints ages: `42s`, `3m12s`, `2h5m`, `3d4h`.
pub fn human_seconds(secs: i64) -> String {
    if secs < 0 {
        return "0s".into();
    }
    let (d, h, m, s) = (
        secs / 86_400,
        (secs % 86_400) / 3600,
        (secs % 3600) / 60,
        secs % 60,
    );
    if d > 0 {
        if h > 0 {
            format!("{d}d{h}h")
        } else {
            format!("{d}d")
        }
    } else if h > 0 {
        if m > 0 {
            format!("{h}h{m}m")
        } else {
            format!("{h}h")
        }
    } else if m > 0 {
        if s > 0 {
            format!("{m}m{s}s")
        } else {
            format!("{m}m")
        }
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::human_seconds;

    #[test]
    fn human_seconds_reads_like_kubectl_ages() {
        assert_eq!(human_seconds(0), "0s");
        assert_eq!(human_seconds(42), "42s");
        assert_eq!(human_seconds(60), "1m");
        assert_eq!(human_seconds(192), "3m12s");
        assert_eq!(human_seconds(7500), "2h5m");
        assert_eq!(human_seconds(7200), "2h");
        assert_eq!(human_seconds(86_400 * 3 + 3600 * 4 + 5), "3d4h");
        assert_eq!(human_seconds(-5), "0s");
    }
}
