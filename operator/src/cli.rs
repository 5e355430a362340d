//! Command line of `geo-operator`. Every option also reads an environment variable.

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

/// The geoforge operator: turns GeoSite and Replicable resources into sidecar workloads for the
/// sites local to this cluster, serves the internal proxy-config API to those sidecars, and
/// writes replication status to the resources.
#[derive(Parser, Debug, Clone)]
#[command(name = "geo-operator", version, about, long_about = None)]
pub struct Cli {
    /// Sites (GeoSite names) whose workloads run in this cluster, comma-separated. Other
    /// GeoSites are peers: only their URLs and public keys are used.
    #[arg(long, env = "GEO_LOCAL_SITES", value_delimiter = ',', required = true)]
    pub local_sites: Vec<String>,

    /// Watch only this namespace (default: every namespace the operator may read).
    #[arg(long, env = "GEO_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Listen address of the internal proxy-config API (`GET /api/v4/geo/proxy`).
    #[arg(long, env = "GEO_API_LISTEN", default_value = "0.0.0.0:8082")]
    pub api_listen: SocketAddr,

    /// Listen address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "GEO_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Base URL of the proxy-config API as the sidecars reach it (the operator's Service);
    /// rendered into every secondary's config as `primary.internalApi`.
    #[arg(
        long,
        env = "GEO_PROXY_CONFIG_URL",
        default_value = "http://geo-operator.geoforge-system.svc:8082"
    )]
    pub proxy_config_url: String,

    /// Sidecar image for sites that do not set `spec.image`.
    #[arg(long, env = "GEO_SIDECAR_IMAGE", default_value = concat!("ghcr.io/geoforge/geo-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// Run controllers only while holding the leader lease (`false` for a single replica
    /// or local runs).
    #[arg(long, env = "GEO_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "GEO_LEASE_NAME", default_value = "geo-operator-leader")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the operator's own namespace, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// How often the sidecars' status is read and written to the resources.
    #[arg(long, env = "GEO_STATUS_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Read every sidecar's admin port at this base URL instead of its pod DNS name (tests
    /// that serve a status endpoint from outside the cluster).
    #[arg(long, env = "GEO_STATUS_BASE_URL")]
    pub status_base_url: Option<String>,

    /// Log filter (tracing syntax), e.g. `info` or `geo_operator=debug,kube=info`.
    #[arg(long, env = "GEO_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "GEO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    geoforge_crds::duration::parse(s).map_err(|e| e.to_string())
}

impl Cli {
    /// Problems clap cannot see.
    pub fn validate(&self) -> Result<(), String> {
        for s in &self.local_sites {
            if !geoforge_crds::config::is_dns_label(s) {
                return Err(format!(
                    "--local-sites: {s:?} is not a site name (a DNS label)"
                ));
            }
        }
        if self.status_interval < Duration::from_secs(1) {
            return Err("--status-interval: at least 1s".into());
        }
        geoforge_crds::config::check_url(&self.proxy_config_url, true)
            .map_err(|e| format!("--proxy-config-url: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_has_help() {
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            if arg.get_id() == "help" || arg.get_id() == "version" {
                continue;
            }
            assert!(
                arg.get_help().is_some_and(|h| !h.to_string().is_empty()),
                "--{} has no help",
                arg.get_id()
            );
        }
        cmd.debug_assert();
    }

    #[test]
    fn parses_sites_and_switches() {
        let cli = Cli::try_parse_from([
            "geo-operator",
            "--local-sites",
            "paris,tokyo",
            "--leader-election",
            "false",
            "--log-format",
            "json",
            "--status-interval",
            "5s",
        ])
        .unwrap();
        assert_eq!(cli.local_sites, ["paris", "tokyo"]);
        assert!(!cli.leader_election);
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.status_interval, Duration::from_secs(5));
        assert!(cli.validate().is_ok());
        let bad = Cli::try_parse_from(["geo-operator", "--local-sites", "Paris"]).unwrap();
        assert!(bad.validate().is_err());
        assert!(
            Cli::try_parse_from(["geo-operator"]).is_err(),
            "--local-sites is required"
        );
    }
}
