//! The installed stack (issue 8), as `e2e/run.sh` sets it up: the chart's operator, a primary
//! and a secondary site with the embedded forge, the `repositories` replicable. Git runs on
//! this machine and reaches the sites through `kubectl port-forward`.
//!
//! What is checked: a push through the secondary lands on the primary; the `Replicable`
//! reports the secondary `Synced=True` with matching counts; a clone through the secondary is
//! served from its replica (the secondary's `geo_accel_served_locally` counter moves); deleting
//! a `GeoSite` removes its workloads but keeps its key Secret.
//!
//! The sites come from the environment run.sh exports (defaults in brackets):
//! `GEOFORGE_E2E_PRIMARY[_NS]` [paris, geo-e2e-paris], `GEOFORGE_E2E_SECONDARY[_NS]` [tokyo,
//! geo-e2e-tokyo], `GEOFORGE_E2E_USER` / `GEOFORGE_E2E_PASSWORD` (the forge's basic auth),
//! `GEOFORGE_E2E_EPHEMERAL` [lisbon]: a site name the operator has in `--local-sites` but that
//! run.sh does not create, for the delete test.

use anyhow::{Context, Result, bail, ensure};
use geoforge_crds::condition::find;
use geoforge_crds::{GeoSite, Replicable};
use geoforge_e2e::eventually_ok;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(240);

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

struct Stack {
    primary: String,
    primary_ns: String,
    secondary: String,
    secondary_ns: String,
    user: String,
    password: String,
}

fn stack() -> Result<Stack> {
    ensure!(
        std::env::var_os("KUBECONFIG").is_some(),
        "needs a cluster: set KUBECONFIG (e2e/run.sh sets up the stack these tests use)"
    );
    let primary = env("GEOFORGE_E2E_PRIMARY", "paris");
    let secondary = env("GEOFORGE_E2E_SECONDARY", "tokyo");
    Ok(Stack {
        primary_ns: env("GEOFORGE_E2E_PRIMARY_NS", &format!("geo-e2e-{primary}")),
        secondary_ns: env("GEOFORGE_E2E_SECONDARY_NS", &format!("geo-e2e-{secondary}")),
        primary,
        secondary,
        user: env("GEOFORGE_E2E_USER", "e2e"),
        password: std::env::var("GEOFORGE_E2E_PASSWORD").context(
            "GEOFORGE_E2E_PASSWORD: the embedded forge's password (e2e/run.sh exports it)",
        )?,
    })
}

/// `kubectl port-forward` to `target` in `ns`; the local port is read from its output.
struct PortForward {
    child: Child,
    port: u16,
}

impl PortForward {
    fn start(ns: &str, target: &str, remote: u16) -> Result<PortForward> {
        let mut child = Command::new("kubectl")
            .args(["-n", ns, "port-forward", target, &format!(":{remote}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("kubectl port-forward")?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // "Forwarding from 127.0.0.1:41234 -> 8080"
                if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                    && let Some(port) = rest.split_whitespace().next()
                {
                    let _ = tx.send(port.parse::<u16>().ok());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(port)) => Ok(PortForward { child, port }),
            _ => {
                let _ = child.kill();
                bail!("kubectl port-forward {target} in {ns} did not start")
            }
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir))
}

/// Sum of a Prometheus counter family's samples whose labels contain `label`.
fn counter(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    ensure!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "GET {path}: {body:.200}"
    );
    Ok(body)
}

fn tag() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 0xff_ffff
    )
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn stack_push_and_clone_through_the_secondary() -> Result<()> {
    let st = stack()?;
    let client = Client::try_default().await?;
    let repo = format!("e2e/stack-{}.git", tag());

    // A new bare repository on the primary's repository volume (the embedded forge serves
    // storageRoot/<sourcePath of the repository replicable>).
    run(Command::new("kubectl").args([
        "-n",
        &st.primary_ns,
        "exec",
        &format!("{}-geo-0", st.primary),
        "-c",
        "sidecar",
        "--",
        "git",
        "init",
        "--bare",
        "--initial-branch=main",
        &format!("/var/lib/geoforge/repositories/repositories/{repo}"),
    ]))?;

    let svc = PortForward::start(&st.secondary_ns, &format!("svc/{}-geo", st.secondary), 8080)?;
    let admin = PortForward::start(
        &st.secondary_ns,
        &format!("pod/{}-geo-0", st.secondary),
        8081,
    )?;
    let url = format!(
        "http://{}:{}@127.0.0.1:{}/{repo}",
        st.user, st.password, svc.port
    );

    // Push through the secondary: proxied to the primary.
    let tmp = tempfile_dir("push")?;
    let work = tmp.path().to_path_buf();
    git(&work, &["init", "-q", "-b", "main"])?;
    std::fs::write(work.join("README"), "geoforge e2e\n")?;
    git(&work, &["add", "README"])?;
    git(
        &work,
        &[
            "-c",
            "user.name=e2e",
            "-c",
            "user.email=e2e@example.test",
            "commit",
            "-qm",
            "e2e",
        ],
    )?;
    let head = git(&work, &["rev-parse", "HEAD"])?;
    git(&work, &["push", "-q", &url, "HEAD:refs/heads/main"])?;

    // The primary has it.
    let on_primary = run(Command::new("kubectl").args([
        "-n",
        &st.primary_ns,
        "exec",
        &format!("{}-geo-0", st.primary),
        "-c",
        "sidecar",
        "--",
        "git",
        "--git-dir",
        &format!("/var/lib/geoforge/repositories/repositories/{repo}"),
        "rev-parse",
        "refs/heads/main",
    ]))?;
    assert_eq!(on_primary, head, "the push reached the primary");

    // The Replicable reports the secondary synced, with consistent counts.
    let reps: Api<Replicable> = Api::namespaced(client.clone(), &st.primary_ns);
    let secondary = st.secondary.clone();
    let report = eventually_ok("repositories Synced=True on the secondary", WAIT, || {
        let reps = reps.clone();
        let secondary = secondary.clone();
        async move {
            let rep = reps.get("repositories").await?;
            let Some(status) = rep.status else {
                return Ok(None);
            };
            let Some(site) = status.sites.iter().find(|s| s.site == secondary).cloned() else {
                return Ok(None);
            };
            let synced = find(&status.conditions, "Synced").is_some_and(|c| c.is_true());
            let c = site.counts;
            Ok((synced && c.total >= 1 && c.synced == c.total).then_some(site))
        }
    })
    .await?;
    assert_eq!(report.counts.failed, 0, "{report:?}");
    assert_eq!(report.counts.pending, 0, "{report:?}");

    // Clone through the secondary: the fetch is served from the replica.
    let before = counter(
        &http_get(admin.port, "/-/metrics").await?,
        "geo_accel_served_locally",
        "git_upload_pack",
    );
    let served = eventually_ok("a clone served from the replica", WAIT, || {
        let url = url.clone();
        let head = head.clone();
        let admin = admin.port;
        async move {
            let tmp = tempfile_dir("clone")?;
            git(tmp.path(), &["clone", "-q", &url, "c"])?;
            let got = git(&tmp.path().join("c"), &["rev-parse", "HEAD"])?;
            ensure!(got == head, "cloned {got}, pushed {head}");
            let after = counter(
                &http_get(admin, "/-/metrics").await?,
                "geo_accel_served_locally",
                "git_upload_pack",
            );
            Ok((after > before).then_some(after))
        }
    })
    .await?;
    assert!(served > before);
    Ok(())
}

fn tempfile_dir(what: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("geoforge-e2e-{what}-"))
        .tempdir()?)
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn stack_deleting_a_site_removes_its_objects_but_keeps_its_key() -> Result<()> {
    ensure!(
        std::env::var_os("KUBECONFIG").is_some(),
        "needs a cluster: set KUBECONFIG"
    );
    let client = Client::try_default().await?;
    let name = env("GEOFORGE_E2E_EPHEMERAL", "lisbon");
    let ns = format!("geo-e2e-{name}-{}", tag());
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
    )
    .await?;
    let result = delete_site_flow(&client, &ns, &name).await;
    let _ = nss.delete(&ns, &DeleteParams::background()).await;
    result
}

async fn delete_site_flow(client: &Client, ns: &str, name: &str) -> Result<()> {
    let sites: Api<GeoSite> = Api::namespaced(client.clone(), ns);
    let site: GeoSite = serde_json::from_value(json!({
        "apiVersion": "geoforge.dev/v1alpha1",
        "kind": "GeoSite",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "role": "secondary",
            "externalUrl": format!("http://{name}-geo.{ns}.svc:8080"),
            "allowInsecure": true,
            "replicas": 1,
            "storage": { "repositories": { "size": "256Mi" }, "state": { "size": "128Mi" } },
        },
    }))?;
    sites.create(&PostParams::default(), &site).await?;

    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let objects = |present: bool| {
        let (sts, svcs, cms) = (sts.clone(), svcs.clone(), cms.clone());
        let name = name.to_string();
        move || {
            let (sts, svcs, cms, name) = (sts.clone(), svcs.clone(), cms.clone(), name.clone());
            async move {
                let found = [
                    sts.get_opt(&format!("{name}-geo")).await?.is_some(),
                    svcs.get_opt(&format!("{name}-geo")).await?.is_some(),
                    svcs.get_opt(&format!("{name}-geo-headless"))
                        .await?
                        .is_some(),
                    cms.get_opt(&format!("{name}-geo-config")).await?.is_some(),
                ];
                Ok(found.iter().all(|f| *f == present).then_some(()))
            }
        }
    };
    eventually_ok(
        "the site's StatefulSet, Services and ConfigMap",
        WAIT,
        objects(true),
    )
    .await?;
    let key = eventually_ok("the site's key Secret", WAIT, || {
        let secrets = secrets.clone();
        let name = name.to_string();
        async move { Ok(secrets.get_opt(&format!("{name}-geo-key")).await?) }
    })
    .await?;
    assert!(
        key.metadata.owner_references.unwrap_or_default().is_empty(),
        "the key Secret is never owned by the GeoSite"
    );

    sites.delete(name, &DeleteParams::foreground()).await?;
    eventually_ok("the site's objects gone", WAIT, objects(false)).await?;
    let kept = secrets.get(&format!("{name}-geo-key")).await?;
    assert_eq!(
        kept.metadata.uid, key.metadata.uid,
        "the key Secret survives"
    );
    Ok(())
}
