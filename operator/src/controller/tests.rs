//! Reconciler tests against a mocked API server (tower-test): every request the reconciler
//! makes is checked in order, answered, and nothing else may be sent.

use super::geosite::{error_policy, reconcile};
use super::{Backoff, Context};
use crate::build::secret::key_secret;
use crate::build::testdata::*;
use crate::build::{CONFIG_CHECKSUM_ANNOTATION, paths};
use crate::error::Error;
use crate::metrics::Metrics;
use geoforge_crds::condition::find;
use geoforge_crds::geosite::GeoSiteStatus;
use geoforge_crds::{GeoSite, Replicable};
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A request the reconciler must send next, and how the fake API server answers it.
struct Expect {
    method: Method,
    /// Must be contained in `path?query`.
    path: &'static str,
    reply: Reply,
}

enum Reply {
    /// Answer with the request body (what SSA and patches return, near enough).
    Echo,
    /// Answer with the request body plus this JSON merged in at the top level.
    EchoWith(Value),
    Json(StatusCode, Value),
}

fn status_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{reason} (test)"), "reason": reason, "code": code})
}

/// Runs the fake API server: checks each expectation in order and returns the bodies
/// received; fails if any further request arrives before the client is dropped.
fn serve(mut handle: Handle, script: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = vec![];
        for (i, exp) in script.into_iter().enumerate() {
            let (req, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("request {i} ({} {}) never sent", exp.method, exp.path));
            let uri = req.uri().to_string();
            assert_eq!(req.method(), exp.method, "request {i}: {uri}");
            assert!(
                uri.contains(exp.path),
                "request {i}: {uri} does not contain {}",
                exp.path
            );
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (code, answer) = match exp.reply {
                Reply::Echo => (StatusCode::OK, body.clone()),
                Reply::EchoWith(extra) => {
                    let mut b = body.clone();
                    for (k, v) in extra.as_object().unwrap() {
                        b[k] = v.clone();
                    }
                    (StatusCode::OK, b)
                }
                Reply::Json(code, v) => (code, v),
            };
            bodies.push(body);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
        bodies
    })
}

fn context(sites: Vec<GeoSite>, reps: Vec<Replicable>, local: &[&str]) -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    // Both caches fully listed, as the watches leave them.
    let (site_reader, mut site_writer) = reflector::store();
    site_writer.apply_watcher_event(&watcher::Event::Init);
    for s in sites {
        site_writer.apply_watcher_event(&watcher::Event::InitApply(s));
    }
    site_writer.apply_watcher_event(&watcher::Event::InitDone);
    let (rep_reader, mut rep_writer) = reflector::store();
    rep_writer.apply_watcher_event(&watcher::Event::Init);
    for r in reps {
        rep_writer.apply_watcher_event(&watcher::Event::InitApply(r));
    }
    rep_writer.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = Context {
        client: client.clone(),
        sites: site_reader,
        replicables: rep_reader,
        local_sites: local.iter().map(|s| s.to_string()).collect(),
        defaults: defaults(),
        recorder: Recorder::new(client, "geoforge-operator-test".into()),
        metrics: Arc::new(Metrics::default()),
        keys: Default::default(),
        backoff: Backoff::default(),
    };
    (Arc::new(ctx), handle)
}

fn existing_secret(site: &GeoSite) -> Value {
    let mut s =
        serde_json::to_value(key_secret(site, &geoforge_crds::auth::generate_key())).unwrap();
    s["metadata"]["resourceVersion"] = "7".into();
    s
}

fn ready_sts(replicas: i32) -> Value {
    json!({"status": {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                      "observedGeneration": 1, "availableReplicas": replicas}})
}

fn applies(sts_reply: Reply) -> Vec<Expect> {
    vec![
        Expect {
            method: Method::PATCH,
            path: "/api/v1/namespaces/geo/configmaps/tokyo-geo-config?&force=true&fieldManager=geoforge-operator",
            reply: Reply::Echo,
        },
        Expect {
            method: Method::PATCH,
            path: "/api/v1/namespaces/geo/services/tokyo-geo-headless?",
            reply: Reply::Echo,
        },
        Expect {
            method: Method::PATCH,
            path: "/api/v1/namespaces/geo/services/tokyo-geo?",
            reply: Reply::Echo,
        },
        Expect {
            method: Method::PATCH,
            path: "/apis/apps/v1/namespaces/geo/statefulsets/tokyo-geo?",
            reply: sts_reply,
        },
    ]
}

async fn run(site: GeoSite, ctx: Arc<Context>) -> (Result<Action, Error>, Action) {
    let site = Arc::new(site);
    let result = reconcile(site.clone(), ctx.clone()).await;
    let action = match &result {
        Ok(a) => a.clone(),
        Err(e) => error_policy(site, e, ctx.clone()),
    };
    (result, action)
}

fn site_of(status_patch: &Value) -> GeoSiteStatus {
    serde_json::from_value(status_patch["status"].clone()).unwrap()
}

#[tokio::test]
async fn create_generates_the_key_applies_everything_and_reports_status() {
    let (ctx, handle) = context(vec![paris(), tokyo()], replicables(), &["tokyo"]);
    let mut script = vec![
        Expect {
            method: Method::GET,
            path: "/api/v1/namespaces/geo/secrets/tokyo-geo-key",
            reply: Reply::Json(StatusCode::NOT_FOUND, status_error(404, "NotFound")),
        },
        Expect {
            method: Method::POST,
            path: "/api/v1/namespaces/geo/secrets?",
            reply: Reply::Echo,
        },
        Expect {
            method: Method::POST,
            path: "/apis/events.k8s.io/v1/namespaces/geo/events",
            reply: Reply::Echo,
        },
    ];
    script.extend(applies(Reply::EchoWith(ready_sts(2))));
    script.push(Expect {
        method: Method::PATCH,
        path: "/apis/geoforge.dev/v1alpha1/namespaces/geo/geosites/tokyo/status",
        reply: Reply::Json(StatusCode::OK, serde_json::to_value(tokyo()).unwrap()),
    });
    script.push(Expect {
        method: Method::POST,
        path: "/apis/events.k8s.io/v1/namespaces/geo/events",
        reply: Reply::Echo,
    });
    let server = serve(handle, script);
    let (result, action) = run(tokyo(), ctx.clone()).await;
    assert_eq!(result.unwrap(), Action::requeue(super::geosite::RESYNC));
    assert_eq!(action, Action::requeue(super::geosite::RESYNC));
    assert!(
        ctx.keys.read().unwrap().contains_key("geo/tokyo"),
        "signing key cached for status reads"
    );
    drop(ctx);
    let bodies = server.await.unwrap();

    // The Secret: no owner reference, the first kid.
    let secret = &bodies[1];
    assert!(secret["metadata"].get("ownerReferences").is_none());
    assert_eq!(secret["metadata"]["name"], "tokyo-geo-key");
    let public = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            secret["data"]["public-key"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    // The event tells the user what to add to spec.publicKeys.
    let note = bodies[2]["note"].as_str().unwrap();
    assert_eq!(bodies[2]["reason"], "KeyGenerated");
    assert!(note.contains("tokyo.1") && note.contains(&public), "{note}");
    // The ConfigMap parses and trusts the generated key; the StatefulSet carries its checksum.
    let yaml = bodies[3]["data"][paths::CONFIG_KEY].as_str().unwrap();
    let cfg = geoforge_crds::config::SidecarConfig::from_yaml(yaml, "cm").unwrap();
    assert!(
        cfg.keys
            .trusted
            .iter()
            .any(|k| k.public_key.as_deref() == Some(public.as_str()))
    );
    assert_eq!(
        bodies[6]["spec"]["template"]["metadata"]["annotations"][CONFIG_CHECKSUM_ANNOTATION],
        crate::build::configmap::checksum(yaml)
    );
    for b in &bodies[3..7] {
        assert_eq!(
            b["metadata"]["ownerReferences"][0]["controller"], true,
            "{}",
            b["metadata"]["name"]
        );
    }
    // Status: Ready, the key in use, the observed generation.
    let status = site_of(&bodies[7]);
    assert!(find(&status.conditions, "Ready").unwrap().is_true());
    assert_eq!(status.public_keys[0].kid, "tokyo.1");
    assert_eq!(status.public_keys[0].key, public);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        bodies[7]["metadata"]["resourceVersion"],
        Value::Null,
        "no resourceVersion on an object without one"
    );
    assert_eq!(bodies[8]["reason"], "SiteReady");
}

#[tokio::test]
async fn update_rerenders_and_writes_only_what_changed() {
    let mut site = tokyo();
    site.metadata.generation = Some(2);
    site.metadata.resource_version = Some("41".into());
    site.spec.max_staleness = "10m".into();
    let secret = existing_secret(&site);
    let (_, key) =
        crate::build::secret::read_key_secret(&serde_json::from_value(secret.clone()).unwrap())
            .unwrap();
    let (ctx, handle) = context(vec![paris(), site.clone()], replicables(), &["tokyo"]);
    let mut script = vec![Expect {
        method: Method::GET,
        path: "/api/v1/namespaces/geo/secrets/tokyo-geo-key",
        reply: Reply::Json(StatusCode::OK, secret.clone()),
    }];
    // Not ready yet: the new revision is rolling out.
    script.extend(applies(Reply::EchoWith(json!({"status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}}))));
    script.push(Expect {
        method: Method::PATCH,
        path: "/geosites/tokyo/status",
        reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
    });
    let server = serve(handle, script);
    let (result, _) = run(site.clone(), ctx.clone()).await;
    result.unwrap();
    drop(ctx);
    let bodies = server.await.unwrap();
    let yaml = bodies[1]["data"][paths::CONFIG_KEY].as_str().unwrap();
    assert!(yaml.contains("maxStaleness: 10m"), "{yaml}");
    let status = site_of(&bodies[5]);
    let ready = find(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Progressing")
    );
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(
        status.public_keys[0].key, key.public_key,
        "the existing key is kept, not regenerated"
    );
    assert_eq!(
        bodies[5]["metadata"]["resourceVersion"], "41",
        "optimistic concurrency on status"
    );

    // Same input again with that status (and the same Secret): nothing to write, no event.
    let mut again = site.clone();
    again.status = Some(status);
    let (ctx, handle) = context(vec![paris(), again.clone()], replicables(), &["tokyo"]);
    let mut script = vec![Expect {
        method: Method::GET,
        path: "/secrets/tokyo-geo-key",
        reply: Reply::Json(StatusCode::OK, secret),
    }];
    script.extend(applies(Reply::EchoWith(json!({"status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}}))));
    let server = serve(handle, script);
    let (result, _) = run(again, ctx.clone()).await;
    result.unwrap();
    drop(ctx);
    // `serve` fails on any request beyond the script: no status patch, no event.
    server.await.unwrap();
}

#[tokio::test]
async fn conflict_on_status_is_retried_soon() {
    let mut site = tokyo();
    site.metadata.resource_version = Some("5".into());
    let (ctx, handle) = context(vec![paris(), site.clone()], replicables(), &["tokyo"]);
    let mut script = vec![Expect {
        method: Method::GET,
        path: "/secrets/tokyo-geo-key",
        reply: Reply::Json(StatusCode::OK, existing_secret(&site)),
    }];
    script.extend(applies(Reply::Echo));
    script.push(Expect {
        method: Method::PATCH,
        path: "/geosites/tokyo/status",
        reply: Reply::Json(StatusCode::CONFLICT, status_error(409, "Conflict")),
    });
    let server = serve(handle, script);
    let (result, action) = run(site, ctx.clone()).await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(err.metric_label(), "conflict");
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    let metrics = ctx.metrics.encode();
    assert!(metrics.contains("reason=\"conflict\"} 1"), "{metrics}");
    drop(ctx);
    server.await.unwrap();
}

#[tokio::test]
async fn conflict_creating_the_secret_uses_the_existing_one() {
    let site = tokyo();
    let theirs = existing_secret(&site);
    let (_, their_key) =
        crate::build::secret::read_key_secret(&serde_json::from_value(theirs.clone()).unwrap())
            .unwrap();
    let (ctx, handle) = context(vec![paris(), site.clone()], replicables(), &["tokyo"]);
    let mut script = vec![
        Expect {
            method: Method::GET,
            path: "/secrets/tokyo-geo-key",
            reply: Reply::Json(StatusCode::NOT_FOUND, status_error(404, "NotFound")),
        },
        Expect {
            method: Method::POST,
            path: "/secrets?",
            reply: Reply::Json(StatusCode::CONFLICT, status_error(409, "AlreadyExists")),
        },
        Expect {
            method: Method::GET,
            path: "/secrets/tokyo-geo-key",
            reply: Reply::Json(StatusCode::OK, theirs),
        },
    ];
    script.extend(applies(Reply::Echo));
    script.push(Expect {
        method: Method::PATCH,
        path: "/geosites/tokyo/status",
        reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
    });
    let server = serve(handle, script);
    let (result, _) = run(site, ctx.clone()).await;
    result.unwrap();
    drop(ctx);
    let bodies = server.await.unwrap();
    assert_eq!(
        site_of(bodies.last().unwrap()).public_keys[0].key,
        their_key.public_key
    );
}

#[tokio::test]
async fn unusable_key_secret_is_reported_and_never_rewritten() {
    let site = tokyo();
    let mut broken = existing_secret(&site);
    broken["data"]["private.pem"] =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"not a key").into();
    let (ctx, handle) = context(vec![paris(), site.clone()], replicables(), &["tokyo"]);
    let script = vec![
        Expect {
            method: Method::GET,
            path: "/secrets/tokyo-geo-key",
            reply: Reply::Json(StatusCode::OK, broken),
        },
        // Only a status write follows: no PUT/PATCH/DELETE of the Secret, no workloads.
        Expect {
            method: Method::PATCH,
            path: "/geosites/tokyo/status",
            reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
        },
    ];
    let server = serve(handle, script);
    let (result, action) = run(site, ctx.clone()).await;
    assert!(matches!(result, Err(Error::KeySecret { .. })));
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    drop(ctx);
    let bodies = server.await.unwrap();
    let ready = find(&site_of(&bodies[1]).conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready.reason, "KeySecretInvalid");
}

#[tokio::test]
async fn two_primaries_set_a_condition_and_back_off_without_applying() {
    let mut osaka = paris();
    osaka.metadata.name = Some("osaka".into());
    osaka.metadata.uid = Some("uid-osaka".into());
    let site = tokyo();
    let (ctx, handle) = context(
        vec![paris(), osaka, site.clone()],
        replicables(),
        &["tokyo"],
    );
    let script = vec![
        Expect {
            method: Method::PATCH,
            path: "/geosites/tokyo/status",
            reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
        },
        Expect {
            method: Method::POST,
            path: "/apis/events.k8s.io/v1/namespaces/geo/events",
            reply: Reply::Echo,
        },
    ];
    let server = serve(handle, script);
    let (result, first) = run(site.clone(), ctx.clone()).await;
    match result {
        Err(Error::Invalid { reason, .. }) => assert_eq!(reason, "PrimaryConflict"),
        other => panic!("expected PrimaryConflict, got {other:?}"),
    }
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    // The backoff grows: no hot loop.
    let second = error_policy(
        Arc::new(site),
        &Error::Invalid {
            reason: "PrimaryConflict".into(),
            message: String::new(),
        },
        ctx.clone(),
    );
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    assert!(
        ctx.metrics
            .encode()
            .contains("reason=\"invalid_primaryconflict\"")
    );
    drop(ctx);
    let bodies = server.await.unwrap();
    let ready = find(&site_of(&bodies[0]).conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PrimaryConflict")
    );
    assert!(ready.message.contains("osaka, paris"), "{}", ready.message);
    assert_eq!(bodies[1]["type"], "Warning");
    assert_eq!(bodies[1]["reason"], "PrimaryConflict");
}

#[tokio::test]
async fn peer_site_gets_a_not_local_condition_and_no_workloads() {
    let site = paris();
    let (ctx, handle) = context(vec![site.clone(), tokyo()], replicables(), &["tokyo"]);
    let script = vec![Expect {
        method: Method::PATCH,
        path: "/geosites/paris/status",
        reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
    }];
    let server = serve(handle, script);
    let (result, _) = run(site, ctx.clone()).await;
    assert_eq!(result.unwrap(), Action::await_change());
    drop(ctx);
    let bodies = server.await.unwrap();
    let ready = find(&site_of(&bodies[0]).conditions, "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("Unknown", "NotLocal")
    );
}

#[tokio::test]
async fn secondary_without_primary_still_runs_with_a_condition() {
    let site = tokyo();
    let (ctx, handle) = context(vec![site.clone()], replicables(), &["tokyo"]);
    let mut script = vec![Expect {
        method: Method::GET,
        path: "/secrets/tokyo-geo-key",
        reply: Reply::Json(StatusCode::OK, existing_secret(&site)),
    }];
    script.extend(applies(Reply::Echo));
    script.push(Expect {
        method: Method::PATCH,
        path: "/geosites/tokyo/status",
        reply: Reply::Json(StatusCode::OK, serde_json::to_value(&site).unwrap()),
    });
    let server = serve(handle, script);
    let (result, _) = run(site, ctx.clone()).await;
    result.unwrap();
    drop(ctx);
    let bodies = server.await.unwrap();
    let yaml = bodies[1]["data"][paths::CONFIG_KEY].as_str().unwrap();
    assert!(
        !yaml.contains("primaryExternalUrl"),
        "no primary to point at"
    );
    let status = site_of(bodies.last().unwrap());
    let rep = find(&status.conditions, "Replicating").unwrap();
    assert_eq!(
        (rep.status.as_str(), rep.reason.as_str()),
        ("False", "NoPrimary")
    );
    assert_eq!(
        site_of(bodies.last().unwrap())
            .conditions
            .iter()
            .filter(|c| c.type_ == "Ready")
            .count(),
        1
    );
}
