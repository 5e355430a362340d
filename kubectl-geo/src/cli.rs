//! Command line and the calls to the API server. Decisions and rendering live in the pure
//! modules; this file fetches, patches and prints.

use crate::{export, keygen, promote, status};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use geoforge_crds::{GeoSite, Replicable};
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use std::io::Write;

/// kubectl plugin for geoforge (install the `kubectl-geo` binary on PATH, run `kubectl geo`).
#[derive(Parser, Debug, Clone)]
#[command(name = "kubectl-geo", bin_name = "kubectl geo", version, about)]
pub struct Cli {
    /// Only this namespace (default: every namespace: Geo sites usually live in several).
    #[arg(short = 'n', long, global = true, env = "KUBECTL_GEO_NAMESPACE")]
    pub namespace: Option<String>,
    /// kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Sites, and per replicable and site: item counts, lag and conditions.
    Status,
    /// Make SITE the primary: the current primary becomes a secondary.
    ///
    /// Refuses when SITE is behind (pending, in-flight or failed items, lag above --max-lag,
    /// no report) unless --force. Patches the GeoSites of this cluster only: apply the same
    /// change in the other clusters (`kubectl geo export-site`).
    Promote {
        /// The secondary to promote.
        site: String,
        /// Promote even when the target is behind (unreplicated writes are lost).
        #[arg(long)]
        force: bool,
        /// Highest replication lag accepted, in seconds.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        max_lag: i64,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a new Ed25519 key pair, or with --site a key Secret manifest for that site.
    Keygen {
        /// Render the key Secret of this site (`<site>-geo-key`, the operator's format).
        #[arg(long)]
        site: Option<String>,
        /// Key number: the key id is `<site>.<n>` (raise it when rotating).
        #[arg(long, default_value_t = 1)]
        index: u32,
    },
    /// Print SITE's GeoSite with the public keys in use, to apply in the other clusters.
    ExportSite {
        /// The site to export.
        site: String,
    },
}

/// Parses the arguments, connects with the kubeconfig and runs the command.
pub async fn main_with(cli: Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if let Command::Keygen { site, index } = &cli.command {
        return keygen_cmd(site.as_deref(), cli.namespace.as_deref(), *index, out);
    }
    let config = if cli.context.is_none() && cli.kubeconfig.is_none() {
        Config::infer()
            .await
            .context("no cluster: set KUBECONFIG")?
    } else {
        let opts = KubeConfigOptions {
            context: cli.context.clone(),
            ..KubeConfigOptions::default()
        };
        let kubeconfig = match &cli.kubeconfig {
            Some(path) => Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?,
            None => Kubeconfig::read().context("reading the kubeconfig")?,
        };
        Config::from_custom_kubeconfig(kubeconfig, &opts).await?
    };
    let client = Client::try_from(config)?;
    run(client, &cli, out).await
}

/// Runs a command against `client` (the cluster tests call this with their own client).
pub async fn run(client: Client, cli: &Cli, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let ns = cli.namespace.as_deref();
    match &cli.command {
        Command::Status => {
            let (sites, reps) = fetch(&client, ns).await?;
            out.write_all(status::render(&sites, &reps, chrono::Utc::now()).as_bytes())?;
        }
        Command::Promote {
            site,
            force,
            max_lag,
            dry_run,
        } => {
            let (sites, reps) = fetch(&client, ns).await?;
            let plan = promote::preflight(site, &sites, &reps, *max_lag, *force)
                .map_err(|r| anyhow::anyhow!("{r}"))?;
            for o in &plan.overridden {
                writeln!(out, "warning: --force overrides: {o}")?;
            }
            for d in &plan.demote {
                writeln!(out, "demote  {d}: primary -> secondary")?;
            }
            writeln!(
                out,
                "promote {}: secondary -> primary{}",
                plan.target,
                if plan.scale_to_one {
                    " (replicas -> 1: a primary runs one instance)"
                } else {
                    ""
                }
            )?;
            if *dry_run {
                writeln!(out, "dry run: nothing changed")?;
                return Ok(());
            }
            let pp = PatchParams::default();
            // Demote first: two primaries must never exist at once. Secondaries see "primary
            // unknown" for the moment in between and serve fresh reads only (DESIGN §3).
            for d in &plan.demote {
                let api: Api<GeoSite> = Api::namespaced(client.clone(), &d.namespace);
                api.patch(&d.name, &pp, &Patch::Merge(promote::demote_patch()))
                    .await
                    .with_context(|| format!("demoting {d}"))?;
            }
            let api: Api<GeoSite> = Api::namespaced(client.clone(), &plan.target.namespace);
            api.patch(
                &plan.target.name,
                &pp,
                &Patch::Merge(promote::promote_patch()),
            )
            .await
            .with_context(|| {
                format!(
                    "promoting {} (the old primary is already demoted: re-run promote)",
                    plan.target
                )
            })?;
            writeln!(
                out,
                "{} is the primary in this cluster. Apply the same roles in every other cluster:",
                plan.target.name
            )?;
            for s in plan.demote.iter().chain([&plan.target]) {
                writeln!(
                    out,
                    "  kubectl geo -n {} export-site {} | kubectl --context OTHER apply -f -",
                    s.namespace, s.name
                )?;
            }
        }
        Command::ExportSite { site } => {
            let sites = list::<GeoSite>(&client, ns).await?;
            let found: Vec<&GeoSite> = sites.iter().filter(|s| s.name_any() == *site).collect();
            let s = match found.as_slice() {
                [] => bail!("no GeoSite named {site:?}"),
                [one] => *one,
                _ => bail!("GeoSite {site:?} exists in several namespaces: choose one with -n"),
            };
            let e = export::export_site(s);
            out.write_all(export::to_yaml(&e)?.as_bytes())?;
        }
        Command::Keygen { site, index } => keygen_cmd(site.as_deref(), ns, *index, out)?,
    }
    Ok(())
}

fn keygen_cmd(
    site: Option<&str>,
    ns: Option<&str>,
    index: u32,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let key = geoforge_crds::auth::generate_key();
    match site {
        Some(site) => out.write_all(keygen::secret_manifest(site, ns, index, &key)?.as_bytes())?,
        None => out.write_all(keygen::plain(&key).as_bytes())?,
    }
    Ok(())
}

async fn fetch(
    client: &Client,
    ns: Option<&str>,
) -> anyhow::Result<(Vec<GeoSite>, Vec<Replicable>)> {
    Ok((list(client, ns).await?, list(client, ns).await?))
}

async fn list<K>(client: &Client, ns: Option<&str>) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let kind = K::kind(&K::DynamicType::default()).to_string();
    Ok(api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {kind}s (are the geoforge CRDs installed?)"))?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn promote_flags_parse() {
        let cli = Cli::try_parse_from([
            "kubectl-geo",
            "-n",
            "geo-tokyo",
            "promote",
            "tokyo",
            "--force",
            "--max-lag",
            "300",
        ])
        .unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("geo-tokyo"));
        match cli.command {
            Command::Promote {
                site,
                force,
                max_lag,
                dry_run,
            } => {
                assert_eq!(site, "tokyo");
                assert!(force && !dry_run);
                assert_eq!(max_lag, 300);
            }
            other => panic!("{other:?}"),
        }
        let default = Cli::try_parse_from(["kubectl-geo", "promote", "tokyo"]).unwrap();
        assert!(matches!(
            default.command,
            Command::Promote {
                max_lag: 60,
                force: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["kubectl-geo", "promote"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-geo", "export-site"]).is_err());
    }

    #[tokio::test]
    async fn keygen_needs_no_cluster() {
        let cli = Cli::try_parse_from([
            "kubectl-geo",
            "keygen",
            "--site",
            "tokyo",
            "-n",
            "geo-tokyo",
        ])
        .unwrap();
        let mut out = Vec::new();
        main_with(cli, &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("name: tokyo-geo-key"), "{text}");
        assert!(text.contains("namespace: geo-tokyo"), "{text}");
    }
}
