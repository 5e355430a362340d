//! `kubectl geo` against a real API server: the plugin's commands run through the same
//! library entry point as the binary (`kubectl_geo::cli::run`) with the test's client.
//!
//! Each test works in a namespace of its own with site names no operator has in
//! `--local-sites`, so the operator treats them as peers and creates no workloads. The
//! operator does rewrite `Replicable` status from its local sites every status interval; the
//! tests that need a report write it and read it back at once, retrying (bounded) when a
//! status pass overwrote it in between.
//!
//! Only the promote test creates a primary: while it exists, an operator watching every
//! namespace sees two primaries (`PrimaryConflict`) and holds its sites. The tests run one at a
//! time (a lock) and each waits until its namespace is gone, so the conflict ends with the
//! test; other e2e test binaries run after this one, never beside it.

use anyhow::Context;
use geoforge_crds::auth::{decode_public_key, generate_key};
use geoforge_crds::{GeoSite, Replicable};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use kubectl_geo::cli::{Cli, run};
use serde_json::json;

/// One scratch namespace at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A namespace for one test, deleted at the end whatever happened.
struct Scratch {
    client: Client,
    ns: String,
    /// Suffix for site names, unique per test run.
    tag: String,
}

impl Scratch {
    async fn new(test: &str) -> anyhow::Result<Scratch> {
        let client = Client::try_default()
            .await
            .context("no cluster: set KUBECONFIG")?;
        let tag = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
                % 0xff_ffff
        );
        let ns = format!("geo-plugin-{test}-{tag}");
        let nss: Api<Namespace> = Api::all(client.clone());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": ns, "labels": { "geoforge.dev/e2e": "plugin" } }
            }))?,
        )
        .await?;
        Ok(Scratch { client, ns, tag })
    }

    /// Deletes the namespace and waits (watching, bounded) until it is gone, so no GeoSite of
    /// this test outlives it.
    async fn cleanup(&self) {
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let Ok(ns) = nss.get(&self.ns).await else {
            return;
        };
        let uid = ns.metadata.uid.clone().unwrap_or_default();
        if nss
            .delete(&self.ns, &DeleteParams::background())
            .await
            .is_err()
        {
            return;
        }
        let gone = await_condition(nss, &self.ns, conditions::is_deleted(&uid));
        if tokio::time::timeout(std::time::Duration::from_secs(180), gone)
            .await
            .is_err()
        {
            eprintln!("namespace {} still terminating after 180s", self.ns);
        }
    }

    fn site_name(&self, base: &str) -> String {
        format!("{base}-{}", self.tag)
    }

    async fn apply_site(&self, name: &str, role: &str, forge: bool) -> anyhow::Result<GeoSite> {
        let mut spec = json!({
            "role": role,
            "externalUrl": format!("https://git.{name}.example.com"),
            "internalUrl": format!("https://geo.{name}.example.com"),
            "replicas": 1,
        });
        if forge {
            spec["forge"] = json!({ "embedded": {} });
        }
        let site: GeoSite = serde_json::from_value(json!({
            "apiVersion": "geoforge.dev/v1alpha1",
            "kind": "GeoSite",
            "metadata": { "name": name, "namespace": self.ns },
            "spec": spec,
        }))?;
        let api: Api<GeoSite> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api.create(&PostParams::default(), &site).await?)
    }

    async fn apply_replicable(&self, name: &str, sites: &[&str]) -> anyhow::Result<Replicable> {
        let rep: Replicable = serde_json::from_value(json!({
            "apiVersion": "geoforge.dev/v1alpha1",
            "kind": "Replicable",
            "metadata": { "name": name, "namespace": self.ns },
            "spec": {
                "type": "repository",
                "sourcePath": "repositories",
                "include": ["**/*.git"],
                "sites": sites,
            },
        }))?;
        let api: Api<Replicable> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api.create(&PostParams::default(), &rep).await?)
    }

    /// Writes a report for `site` into the replicable's status (as the operator would).
    async fn report(
        &self,
        rep: &str,
        site: &str,
        counts: (i64, i64, i64, i64),
        lag: i64,
    ) -> anyhow::Result<()> {
        let (total, synced, pending, failed) = counts;
        let api: Api<Replicable> = Api::namespaced(self.client.clone(), &self.ns);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        api.patch_status(
            rep,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "sites": [{
                    "site": site, "total": total, "synced": synced, "pending": pending,
                    "failed": failed, "verified": synced, "verificationFailed": 0,
                    "lastEventId": 481, "lagSeconds": lag,
                }],
                "conditions": [{
                    "type": "Synced", "status": if pending + failed == 0 { "True" } else { "False" },
                    "reason": "E2E", "message": "written by the plugin test",
                    "lastTransitionTime": now,
                }],
            }})),
        )
        .await?;
        Ok(())
    }

    async fn geo(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec!["kubectl-geo", "-n", self.ns.as_str()];
        argv.extend_from_slice(args);
        let cli = <Cli as clap::Parser>::try_parse_from(argv)?;
        let mut out = Vec::new();
        run(self.client.clone(), &cli, &mut out).await?;
        Ok(String::from_utf8(out)?)
    }

    async fn role(&self, site: &str) -> anyhow::Result<String> {
        let api: Api<GeoSite> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api.get(site).await?.spec.role.as_str().to_string())
    }
}

/// Runs `body` in a scratch namespace and deletes the namespace afterwards, also when the
/// body fails or panics (it runs as a task; its panic is re-raised after the cleanup).
async fn in_scratch<F, Fut>(test: &str, body: F)
where
    F: FnOnce(&'static Scratch) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let _serial = SERIAL.lock().await;
    // Leaked (a few bytes per test) so the body's task may borrow it.
    let scratch: &'static Scratch = Box::leak(Box::new(
        Scratch::new(test).await.expect("scratch namespace"),
    ));
    let outcome = tokio::spawn(body(scratch)).await;
    scratch.cleanup().await;
    match outcome {
        Ok(result) => result.unwrap(),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("test task: {e}"),
    }
}

/// `f` until it returns Ok, at most `tries` times (status passes of the operator may overwrite
/// a report the test wrote; each try rewrites it).
async fn retry<T, Fut>(tries: usize, mut f: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut last = None;
    for _ in 0..tries {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tries > 0"))
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn plugin_status_shows_sites_and_replication_counts() {
    in_scratch("status", |s| async move {
        let (p, t) = (s.site_name("paris"), s.site_name("tokyo"));
        // Disabled, not primary: no second primary beside the cluster's own (module docs).
        s.apply_site(&p, "disabled", true).await?;
        s.apply_site(&t, "secondary", false).await?;
        s.apply_replicable("repositories", &[&t]).await?;
        let out = retry(3, || async {
            s.report("repositories", &t, (12, 9, 2, 1), 75).await?;
            let out = s.geo(&["status"]).await?;
            anyhow::ensure!(out.contains("1m15s"), "report overwritten:\n{out}");
            Ok(out)
        })
        .await?;
        let site_row = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .map(str::to_string)
        };
        let prow = site_row(&p).context("disabled site's row")?;
        assert!(prow.contains("disabled"), "{prow}");
        let trow = site_row(&t).context("secondary row")?;
        assert!(trow.contains("secondary"), "{trow}");
        let rrow = out
            .lines()
            .find(|l| l.starts_with("repositories") && l.contains(&t))
            .context("replication row")?;
        let cells: Vec<&str> = rrow.split_whitespace().collect();
        // REPLICABLE NAMESPACE TYPE SITE TOTAL SYNCED PENDING FAILED VERIFIED/FAILED LAG EVENT …
        assert_eq!(
            &cells[4..10],
            ["12", "9", "2", "1", "9/0", "1m15s"],
            "{rrow}"
        );
        assert!(rrow.contains("Synced=False"), "{rrow}");
        Ok(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn plugin_promote_refuses_a_behind_target_then_switches_roles() {
    in_scratch("promote", |s| async move {
        let (p, t) = (s.site_name("paris"), s.site_name("tokyo"));
        s.apply_site(&p, "primary", true).await?;
        s.apply_site(&t, "secondary", true).await?;
        s.apply_replicable("repositories", &[&t]).await?;

        // Behind: pending and failed items. Refused, nothing changes.
        s.report("repositories", &t, (10, 7, 2, 1), 5).await?;
        let err = s.geo(&["promote", &t]).await.unwrap_err().to_string();
        assert!(err.contains("refusing to promote"), "{err}");
        assert_eq!(s.role(&p).await?, "primary");
        assert_eq!(s.role(&t).await?, "secondary");

        // Dry run: the plan, no change.
        let out = s.geo(&["promote", &t, "--force", "--dry-run"]).await?;
        assert!(out.contains("dry run: nothing changed"), "{out}");
        assert_eq!(s.role(&t).await?, "secondary");

        // Caught up: promoted, the old primary demoted.
        let out = retry(3, || async {
            s.report("repositories", &t, (10, 10, 0, 0), 1).await?;
            s.geo(&["promote", &t, "--max-lag", "30"]).await
        })
        .await?;
        assert!(out.contains(&format!("{t} is the primary")), "{out}");
        assert_eq!(s.role(&p).await?, "secondary");
        assert_eq!(s.role(&t).await?, "primary");

        // And back with --force (the old primary has no report at all: behind).
        let err = s.geo(&["promote", &p]).await.unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        s.geo(&["promote", &p, "--force"]).await?;
        assert_eq!(s.role(&p).await?, "primary");
        assert_eq!(s.role(&t).await?, "secondary");
        Ok(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn plugin_export_site_carries_the_key_in_use_and_applies_cleanly() {
    in_scratch("export", |s| async move {
        let p = s.site_name("paris");
        s.apply_site(&p, "secondary", false).await?;
        let key = generate_key();
        let kid = format!("{p}.1");
        // Not a local site of any operator: its status is ours to write.
        let api: Api<GeoSite> = Api::namespaced(s.client.clone(), &s.ns);
        api.patch_status(
            &p,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "status": { "publicKeys": [{ "kid": kid, "key": key.public_key }] } }),
            ),
        )
        .await?;
        let yaml = s.geo(&["export-site", &p]).await?;
        let exported: GeoSite = serde_saphyr::from_str(&yaml)?;
        assert_eq!(exported.spec.public_keys.len(), 1, "{yaml}");
        assert_eq!(exported.spec.public_keys[0].kid, kid);
        assert_eq!(exported.spec.public_keys[0].key, key.public_key);
        assert!(exported.metadata.resource_version.is_none());
        // The API server accepts it (CRD schema and CEL rules), as another cluster would.
        let applied = api
            .patch(
                &p,
                &PatchParams::apply("kubectl-geo-e2e").dry_run().force(),
                &Patch::Apply(&exported),
            )
            .await?;
        assert_eq!(applied.spec.public_keys, exported.spec.public_keys);

        let missing = s.geo(&["export-site", "no-such-site"]).await.unwrap_err();
        assert!(
            missing.to_string().contains("no GeoSite named"),
            "{missing}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn plugin_keygen_secret_is_accepted_by_the_api_server() {
    in_scratch("keygen", |s| async move {
        let site = s.site_name("tokyo");
        let yaml = s.geo(&["keygen", "--site", &site, "--index", "3"]).await?;
        let secret: Secret = serde_saphyr::from_str(&yaml)?;
        let api: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
        let created = api
            .create(
                &PostParams {
                    dry_run: true,
                    ..PostParams::default()
                },
                &secret,
            )
            .await?;
        assert_eq!(created.metadata.name, Some(format!("{site}-geo-key")));
        let data = created.data.context("stringData became data")?;
        assert_eq!(String::from_utf8_lossy(&data["kid"].0), format!("{site}.3"));
        decode_public_key(&String::from_utf8_lossy(&data["public-key"].0))
            .map_err(anyhow::Error::msg)?;
        Ok(())
    })
    .await;
}
