//! LFS downloads served by the secondary's replica (issue 6), following the Git LFS batch API
//! with plain HTTP requests: the batch goes to the primary's forge (a stand-in LFS server
//! here, since `git http-backend` has no LFS), and downloads of synced objects come back
//! pointing at the secondary.

use geoforge_tests::httpd::{TestServer, full};
use geoforge_tests::*;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn oid_of(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

#[test]
fn lfs_downloads_of_synced_objects_are_served_by_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let synced = b"large file content, replicated".to_vec();
    let elsewhere = b"an object the primary's disk does not have".to_vec();
    let (oid_a, oid_b) = (oid_of(&synced), oid_of(&elsewhere));
    let lfs_root = d.join("primary/data/lfs-objects");
    let a_path = lfs_root.join(&oid_a[0..2]).join(&oid_a[2..4]).join(&oid_a);
    std::fs::create_dir_all(a_path.parent().unwrap()).unwrap();
    std::fs::write(&a_path, &synced).unwrap();
    std::fs::create_dir_all(d.join("primary/data/repositories")).unwrap();
    std::fs::create_dir_all(d.join("secondary/data")).unwrap();

    // The forge: answers the LFS batch API with download actions on itself.
    let forge = TestServer::start(Arc::new(
        move |_peer, req: http::Request<hyper::body::Incoming>| {
            Box::pin(async move {
                use http_body_util::BodyExt;
                let path = req.uri().path().to_string();
                let auth = req.headers().get("authorization").is_some();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if !path.ends_with("/info/lfs/objects/batch") || !auth {
                    return http::Response::builder()
                        .status(401)
                        .body(full("unauthorized"))
                        .unwrap();
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let op = v["operation"].as_str().unwrap_or("download").to_string();
                let objects: Vec<serde_json::Value> = v["objects"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|o| {
                    let oid = o["oid"].as_str().unwrap_or("").to_string();
                    serde_json::json!({"oid": oid, "size": o["size"], "authenticated": true, "actions": {
                        op.clone(): {"href": format!("http://forge.invalid/lfs/{oid}"), "header": {"Authorization": "forge-secret"}}
                    }})
                })
                .collect();
                let out = serde_json::json!({"transfer": "basic", "objects": objects});
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/vnd.git-lfs+json")
                    .body(full(serde_json::to_vec(&out).unwrap()))
                    .unwrap()
            })
        },
    ));

    let pk = site_key(d, "paris");
    let sk = site_key(d, "tokyo");
    let reps = r#"replicables:
  - { name: repos, type: repository, sourcePath: repositories, include: ["**/*.git"] }
  - { name: lfs, type: blob, sourcePath: lfs-objects, include: ["**"], idTemplate: "{oid:0:2}/{oid:2:2}/{oid}" }"#;
    let primary = Sidecar::start(
        d,
        "primary",
        &format!(
            "siteId: paris\nrole: primary\nexternalUrl: http://127.0.0.1:1\nallowInsecure: true\n\
             stateDir: {d}/primary/state\nstorageRoot: {d}/primary/data\n\
             keys: {{ kid: paris.1, privateKeyFile: {pkf}, trusted: [{{ kid: tokyo.1, publicKey: {spub} }}] }}\n\
             forge: {{ upstreamUrl: \"{forge}\" }}\n{reps}\n",
            d = d.display(),
            pkf = pk.file.display(),
            spub = sk.public,
            forge = forge.url(),
        ),
    );
    let s_port = free_port();
    let secondary = Sidecar::start_on(
        d,
        "secondary",
        &format!(
            "siteId: tokyo\nrole: secondary\nexternalUrl: http://127.0.0.1:{s_port}\nallowInsecure: true\n\
             stateDir: {d}/secondary/state\nstorageRoot: {d}/secondary/data\nprimary: {{ staticUrl: \"{purl}\" }}\n\
             keys: {{ kid: tokyo.1, privateKeyFile: {skf}, trusted: [{{ kid: paris.1, publicKey: {ppub} }}] }}\n{reps}\n",
            d = d.display(),
            purl = primary.url(),
            skf = sk.file.display(),
            ppub = pk.public,
        ),
        s_port,
        free_port(),
    );
    let admin = format!("127.0.0.1:{}", secondary.admin);
    wait_until(WAIT, "the LFS object synced to the secondary", || {
        (metric(&admin, "geo_replicable_synced{replicable=\"lfs\"}") >= 1.0).then_some(())
    });

    let base = format!("127.0.0.1:{s_port}");
    let batch = serde_json::json!({"operation": "download", "transfer": ["basic"], "objects": [
        {"oid": oid_a, "size": synced.len()}, {"oid": oid_b, "size": elsewhere.len()}
    ]});
    let headers = [
        ("Authorization", "Basic YWxpY2U6d29uZGVybGFuZA=="),
        ("Accept", "application/vnd.git-lfs+json"),
        ("Content-Type", "application/vnd.git-lfs+json"),
    ];
    let r = http_request(
        &base,
        "POST",
        "/demo/big.git/info/lfs/objects/batch",
        &headers,
        batch.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let a = &v["objects"][0]["actions"]["download"];
    let b = &v["objects"][1]["actions"]["download"];
    let href = a["href"].as_str().unwrap().to_string();
    assert!(
        href.starts_with(&format!(
            "http://127.0.0.1:{s_port}/-/geo/lfs/lfs/{oid_a}?token="
        )),
        "{href}"
    );
    assert!(
        a.get("header").is_none(),
        "the forge's credentials are not handed out with a local link"
    );
    assert_eq!(
        b["href"],
        format!("http://forge.invalid/lfs/{oid_b}"),
        "objects not synced stay with the primary"
    );

    let path = href.trim_start_matches(&format!("http://127.0.0.1:{s_port}"));
    let before = metric(
        &admin,
        "geo_accel_served_locally_total{route=\"lfs_download\"}",
    );
    let r = http_request(&base, "GET", path, &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, synced);
    assert_eq!(
        r.header("content-length"),
        Some(synced.len().to_string().as_str())
    );
    let r = http_request(&base, "GET", path, &[("Range", "bytes=6-9")], b"").unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &synced[6..10]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 6-9/{}", synced.len()).as_str())
    );
    assert!(
        metric(
            &admin,
            "geo_accel_served_locally_total{route=\"lfs_download\"}"
        ) >= before + 2.0
    );

    // A link is bound to its object and signed: tampering is refused.
    let other = path.replace(&oid_a, &oid_b);
    assert_eq!(
        http_request(&base, "GET", &other, &[], b"").unwrap().status,
        401
    );
    let forged = format!("{}x", path);
    assert_eq!(
        http_request(&base, "GET", &forged, &[], b"")
            .unwrap()
            .status,
        401
    );

    // Uploads always go to the primary, untouched.
    let upload = serde_json::json!({"operation": "upload", "objects": [{"oid": oid_a, "size": synced.len()}]});
    let r = http_request(
        &base,
        "POST",
        "/demo/big.git/info/lfs/objects/batch",
        &headers,
        upload.to_string().as_bytes(),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["objects"][0]["actions"]["upload"]["href"],
        format!("http://forge.invalid/lfs/{oid_a}")
    );
}
