//! Helpers for the cluster tests (`e2e/tests/*.rs`). Every test there is
//! `#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]`: run them against a
//! real API server with `KUBECONFIG=… cargo test -p geoforge-e2e -- --ignored --test-threads=1`.
//!
//! They need `kubectl` on PATH and rights to create namespaces, CRDs and the objects the
//! operator manages. The operator tests start the `geo-operator` binary on this machine
//! (`GEO_OPERATOR_BIN`, default `target/debug/geo-operator`; build it first with
//! `cargo build -p geo-operator`), watching only the test's namespace.

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A client from `KUBECONFIG`; fails with a clear message when it is not set.
pub async fn client() -> Result<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!("set KUBECONFIG to the cluster to test against");
    }
    Ok(Client::try_default().await?)
}

/// Runs `kubectl` with `args` (from the workspace root).
pub fn kubectl(args: &[&str]) -> Result<Output> {
    Command::new("kubectl")
        .args(args)
        .current_dir(root())
        .output()
        .context("cannot run kubectl (is it on PATH?)")
}

/// Runs `kubectl` and requires success; returns stdout.
pub fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies the CRDs (server-side) and waits until the API server serves them.
pub fn install_crds() -> Result<()> {
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", "crds/"])?;
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/geosites.geoforge.dev",
        "crd/replicables.geoforge.dev",
    ])?;
    Ok(())
}

/// Polls `f` every 500 ms until it returns `Some`, failing after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_ok(what, timeout, || {
        let fut = f();
        async move { Ok(fut.await) }
    })
    .await
}

/// [`eventually`] for checks that can fail: an error counts as "not yet", and the last one
/// is in the timeout's message.
pub async fn eventually_ok<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A namespace deleted (without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Result<TestNamespace> {
        let name = format!(
            "{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                % 1_000_000_000
        );
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "geoforge.dev/e2e": "true" } }
        }))?;
        api.create(&PostParams::default(), &ns).await?;
        Ok(TestNamespace { name })
    }

    pub async fn delete(&self, client: &Client) {
        let api: Api<Namespace> = Api::all(client.clone());
        let _ = api.delete(&self.name, &DeleteParams::background()).await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A `geo-operator` process on this machine, killed when dropped.
pub struct Operator {
    child: Child,
}

/// The `geo-operator` binary to run.
pub fn operator_bin() -> PathBuf {
    std::env::var_os("GEO_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/geo-operator"))
}

impl Operator {
    /// Starts the operator for `local_sites`, watching `namespace` only, without leader
    /// election, with `extra` arguments.
    pub fn start(namespace: &str, local_sites: &str, extra: &[&str]) -> Result<Operator> {
        let bin = operator_bin();
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build -p geo-operator` or set GEO_OPERATOR_BIN",
                bin.display()
            );
        }
        let child = Command::new(bin)
            .args([
                "--local-sites",
                local_sites,
                "--namespace",
                namespace,
                "--leader-election",
                "false",
                "--api-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-level",
                "geo_operator=debug,info",
            ])
            .args(extra)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Operator { child })
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
