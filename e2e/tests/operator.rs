//! The operator against a real API server (issue 7). Each test makes its own namespace, starts
//! `geo-operator` on this machine watching only that namespace (no leader election), and
//! checks what appears in the cluster. The sidecar image need not be pullable: nothing here
//! waits for sidecar pods to run; the status test serves a sidecar's status endpoint itself.
//!
//! Run: `cargo build -p geo-operator && KUBECONFIG=… cargo test -p geoforge-e2e --test operator -- --ignored --test-threads=1`.

use anyhow::Result;
use geoforge_crds::auth::{KeyRing, Scope};
use geoforge_crds::condition::find;
use geoforge_crds::wire::{ReplicableReport, StatusReport};
use geoforge_crds::{GeoSite, Replicable};
use geoforge_e2e::{Operator, TestNamespace, client, eventually, install_crds};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

fn site(name: &str, role: &str) -> GeoSite {
    let mut spec = json!({
        "role": role,
        "externalUrl": format!("http://git.{name}.example.test"),
        "internalUrl": format!("http://geo.{name}.example.test"),
        "allowInsecure": true,
        "replicas": 1,
        "storage": {"repositories": {"size": "1Gi"}, "state": {"size": "1Gi"}},
    });
    if role != "secondary" {
        spec["forge"] = json!({"embedded": {}});
    }
    serde_json::from_value(json!({
        "apiVersion": "geoforge.dev/v1alpha1",
        "kind": "GeoSite",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn replicable(name: &str) -> Replicable {
    serde_json::from_value(json!({
        "apiVersion": "geoforge.dev/v1alpha1",
        "kind": "Replicable",
        "metadata": {"name": name},
        "spec": {"type": "repository", "sourcePath": "repositories", "include": ["**/*.git"]},
    }))
    .unwrap()
}

async fn setup(prefix: &str) -> Result<(Client, TestNamespace)> {
    install_crds()?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    Ok((client, ns))
}

fn condition(site: &GeoSite, type_: &str) -> Option<(String, String)> {
    let c = find(&site.status.as_ref()?.conditions, type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn owned_objects_are_collected_and_the_key_survives_recreation() -> Result<()> {
    let (client, ns) = setup("gf-e2e-own").await?;
    let mut op = Operator::start(&ns.name, "paris,tokyo", &[])?;
    let sites: Api<GeoSite> = Api::namespaced(client.clone(), &ns.name);
    sites
        .create(&PostParams::default(), &site("paris", "primary"))
        .await?;
    let tokyo = sites
        .create(&PostParams::default(), &site("tokyo", "secondary"))
        .await?;
    let reps: Api<Replicable> = Api::namespaced(client.clone(), &ns.name);
    reps.create(&PostParams::default(), &replicable("repositories"))
        .await?;
    let uid = tokyo.uid().unwrap();

    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let sts = eventually("tokyo's StatefulSet", WAIT, || async {
        stss.get_opt("tokyo-geo").await.ok().flatten()
    })
    .await?;
    let owned_by_tokyo =
        |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.is_some_and(|r| {
                r.iter()
                    .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "GeoSite")
            })
        };
    assert!(owned_by_tokyo(sts.metadata.owner_references.as_ref()));
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(
        spec.persistent_volume_claim_retention_policy
            .as_ref()
            .unwrap()
            .when_deleted
            .as_deref(),
        Some("Retain")
    );
    for name in ["tokyo-geo", "tokyo-geo-headless"] {
        let svc = svcs.get(name).await?;
        assert!(
            owned_by_tokyo(svc.metadata.owner_references.as_ref()),
            "{name}"
        );
    }
    assert_eq!(
        svcs.get("tokyo-geo")
            .await?
            .spec
            .unwrap()
            .session_affinity
            .as_deref(),
        Some("ClientIP")
    );
    let cm = eventually("tokyo's ConfigMap", WAIT, || async {
        cms.get_opt("tokyo-geo-config").await.ok().flatten()
    })
    .await?;
    assert!(owned_by_tokyo(cm.metadata.owner_references.as_ref()));
    let yaml = &cm.data.unwrap()["sidecar.yaml"];
    let cfg = geoforge_crds::config::SidecarConfig::from_yaml(yaml, "configmap")?;
    assert_eq!(cfg.replicables[0].name, "repositories");

    let secret = secrets.get("tokyo-geo-key").await?;
    assert!(
        secret.metadata.owner_references.is_none(),
        "the key Secret is never owned"
    );
    let public = String::from_utf8(secret.data.unwrap()["public-key"].0.clone())?;
    let status_key = eventually("tokyo's status.publicKeys", WAIT, || async {
        let s = sites.get("tokyo").await.ok()?;
        s.status?.public_keys.first().map(|k| k.key.clone())
    })
    .await?;
    assert_eq!(status_key, public);

    // Delete the GeoSite: the owned objects are garbage-collected, the Secret stays.
    sites.delete("tokyo", &DeleteParams::foreground()).await?;
    eventually("tokyo's StatefulSet to be collected", WAIT, || async {
        matches!(stss.get_opt("tokyo-geo").await, Ok(None)).then_some(())
    })
    .await?;
    eventually("tokyo's ConfigMap to be collected", WAIT, || async {
        matches!(cms.get_opt("tokyo-geo-config").await, Ok(None)).then_some(())
    })
    .await?;
    assert!(
        secrets.get_opt("tokyo-geo-key").await?.is_some(),
        "the key Secret survives"
    );

    // Recreate it: same identity.
    sites
        .create(&PostParams::default(), &site("tokyo", "secondary"))
        .await?;
    let again = eventually("recreated tokyo's status.publicKeys", WAIT, || async {
        let s = sites.get("tokyo").await.ok()?;
        s.status?.public_keys.first().map(|k| k.key.clone())
    })
    .await?;
    assert_eq!(again, public, "recreating the GeoSite keeps its key");
    assert!(op.alive());
    ns.delete(&client).await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn two_primaries_are_reported_on_every_local_site() -> Result<()> {
    let (client, ns) = setup("gf-e2e-two").await?;
    let mut op = Operator::start(&ns.name, "paris,osaka,tokyo", &[])?;
    let sites: Api<GeoSite> = Api::namespaced(client.clone(), &ns.name);
    sites
        .create(&PostParams::default(), &site("paris", "primary"))
        .await?;
    sites
        .create(&PostParams::default(), &site("osaka", "primary"))
        .await?;
    sites
        .create(&PostParams::default(), &site("tokyo", "secondary"))
        .await?;
    for name in ["paris", "osaka", "tokyo"] {
        let (status, _) = eventually(
            &format!("{name}: Ready=False PrimaryConflict"),
            WAIT,
            || async {
                let s = sites.get(name).await.ok()?;
                condition(&s, "Ready").filter(|(_, r)| r == "PrimaryConflict")
            },
        )
        .await?;
        assert_eq!(status, "False");
    }
    let s = sites.get("tokyo").await?;
    let status = s.status.unwrap();
    let msg = &find(&status.conditions, "Ready").unwrap().message;
    assert!(msg.contains("osaka, paris"), "{msg}");
    // Nothing applied for a conflicting primary.
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    assert!(stss.get_opt("osaka-geo").await?.is_none());
    // Demote one: the conflict clears and workloads appear.
    sites
        .patch(
            "osaka",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"role": "secondary"}})),
        )
        .await?;
    eventually("osaka's StatefulSet after demotion", WAIT, || async {
        stss.get_opt("osaka-geo").await.ok().flatten()
    })
    .await?;
    assert!(op.alive(), "no crash loop");
    ns.delete(&client).await;
    Ok(())
}

/// A sidecar's admin port, served from this machine: checks the operator's admin token with
/// the site's public key (read from its key Secret) and answers a fixed report.
async fn serve_status(site: &str, public_key: String, synced: i64) -> Result<String> {
    let mut ring = KeyRing::new(Duration::from_secs(60));
    ring.add_ed25519(&format!("{site}.1"), site, &public_key)
        .map_err(anyhow::Error::msg)?;
    let ring = Arc::new(ring);
    let site_name = site.to_string();
    let app = axum::Router::new().route(
        "/-/geo/status",
        axum::routing::get(move |h: axum::http::HeaderMap| {
            let ring = ring.clone();
            let site = site_name.clone();
            async move {
                use axum::response::IntoResponse;
                let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                if let Err(e) = ring.verify_authorization(auth, &site, Scope::Admin) {
                    return (axum::http::StatusCode::UNAUTHORIZED, e.to_string()).into_response();
                }
                axum::Json(StatusReport {
                    site: site.clone(),
                    instance: format!("{site}-geo-0"),
                    role: "secondary".into(),
                    version: "e2e".into(),
                    geo_api_version: geoforge_crds::GEO_API_VERSION.into(),
                    cursor: 12,
                    last_event_id: 12,
                    replicables: vec![ReplicableReport {
                        replicable: "repositories".into(),
                        total: synced,
                        synced,
                        verified: synced,
                        ..ReplicableReport::default()
                    }],
                    reported_at: chrono::Utc::now(),
                    ..StatusReport::default()
                })
                .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn status_from_a_sidecar_endpoint_reaches_the_resources() -> Result<()> {
    let (client, ns) = setup("gf-e2e-status").await?;
    // Phase 1: let an operator generate tokyo's key, to know which key the endpoint trusts.
    let sites: Api<GeoSite> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let first = Operator::start(&ns.name, "paris,tokyo", &[])?;
    sites
        .create(&PostParams::default(), &site("paris", "primary"))
        .await?;
    sites
        .create(&PostParams::default(), &site("tokyo", "secondary"))
        .await?;
    let reps: Api<Replicable> = Api::namespaced(client.clone(), &ns.name);
    reps.create(&PostParams::default(), &replicable("repositories"))
        .await?;
    let secret = eventually("tokyo's key Secret", WAIT, || async {
        secrets.get_opt("tokyo-geo-key").await.ok().flatten()
    })
    .await?;
    drop(first);
    let public = String::from_utf8(secret.data.unwrap()["public-key"].0.clone())?;
    let base = serve_status("tokyo", public, 42).await?;
    // Phase 2: an operator reading every pod at the served endpoint every 2 s.
    let mut op = Operator::start(
        &ns.name,
        "tokyo",
        &["--status-base-url", &base, "--status-interval", "2s"],
    )?;
    let rep = eventually("repositories status with tokyo's counts", WAIT, || async {
        let r = reps.get("repositories").await.ok()?;
        let st = r.status.clone()?;
        (st.summary?.synced == 42).then_some(r)
    })
    .await?;
    let st = rep.status.unwrap();
    assert_eq!(st.sites[0].site, "tokyo");
    assert_eq!(st.sites[0].last_event_id, 12);
    let synced = find(&st.conditions, "Synced").unwrap();
    assert_eq!(
        (synced.status.as_str(), synced.reason.as_str()),
        ("True", "AllSynced")
    );
    assert!(find(&st.conditions, "Verified").unwrap().is_true());
    let healthy = eventually("tokyo Healthy", WAIT, || async {
        let s = sites.get("tokyo").await.ok()?;
        condition(&s, "Healthy").filter(|(st, _)| st == "True")
    })
    .await?;
    assert_eq!(healthy.1, "StatusRecent");
    assert!(
        sites
            .get("tokyo")
            .await?
            .status
            .unwrap()
            .last_status_time
            .is_some()
    );
    // Printer columns read the summary.
    let table = geoforge_e2e::kubectl_ok(&["get", "rep", "-n", &ns.name])?;
    assert!(table.contains("42"), "{table}");
    assert!(op.alive());
    ns.delete(&client).await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
async fn survives_update_conflicts_and_converges() -> Result<()> {
    let (client, ns) = setup("gf-e2e-conflict").await?;
    let mut op = Operator::start(&ns.name, "paris,tokyo", &[])?;
    let sites: Api<GeoSite> = Api::namespaced(client.clone(), &ns.name);
    sites
        .create(&PostParams::default(), &site("paris", "primary"))
        .await?;
    sites
        .create(&PostParams::default(), &site("tokyo", "secondary"))
        .await?;
    // Write the spec and the status while the operator reconciles: its optimistic-concurrency
    // status writes meet 409s and are retried.
    for i in 0..20 {
        sites
            .patch(
                "tokyo",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"maxStaleness": format!("{}m", 5 + i)}})),
            )
            .await?;
        let _ = sites
            .patch_status(
                "tokyo",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"lastStatusTime": chrono::Utc::now()}})),
            )
            .await;
    }
    let last = sites.get("tokyo").await?;
    let generation = last.metadata.generation;
    eventually("tokyo observed at its latest generation", WAIT, || async {
        let s = sites.get("tokyo").await.ok()?;
        (s.status?.observed_generation == generation).then_some(())
    })
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("the last spec rendered", WAIT, || async {
        let cm = cms.get_opt("tokyo-geo-config").await.ok()??;
        cm.data?["sidecar.yaml"]
            .contains("maxStaleness: 24m")
            .then_some(())
    })
    .await?;
    assert!(op.alive(), "the operator survived the conflicts");
    ns.delete(&client).await;
    Ok(())
}
