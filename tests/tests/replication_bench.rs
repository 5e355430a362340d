//! Replication benchmarks (issue 5), run by `bench/replication.sh` (which builds the release
//! binaries and sets the environment). Each prints `RESULT …` lines.

mod replication_support;

use geoforge_crds::auth::{SigningKey, TokenData};
use geoforge_tests::{
    Sidecar, credentials_line, git, git_cmd, make_bare_repo, poll_until, wait_until,
};
use replication_support::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn work_dir() -> tempfile::TempDir {
    match std::env::var("GEO_BENCH_DIR") {
        Ok(d) => {
            std::fs::create_dir_all(&d).unwrap();
            tempfile::tempdir_in(d).unwrap()
        }
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

/// Push → synced on the secondary, vs a `post-receive` hook running `git push --mirror`.
#[test]
#[ignore = "benchmark: run bench/replication.sh"]
fn bench_push_to_synced_latency() {
    let pushes = env_num("GEO_BENCH_PUSHES", 200);
    let tmp = work_dir();
    let dir = tmp.path();
    let k = keys(dir);
    make_bare_repo(&p_repos(dir).join("g/geo.git"), 1);
    make_bare_repo(&p_repos(dir).join("g/hook.git"), 1);
    // The classic mirror: a post-receive hook pushing to a bare copy on "the secondary".
    let mirror = dir.join("mirror/hook.git");
    git(
        dir,
        &[
            "clone",
            "-q",
            "--mirror",
            p_repos(dir).join("g/hook.git").to_str().unwrap(),
            mirror.to_str().unwrap(),
        ],
    );
    let hook = p_repos(dir).join("g/hook.git/hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec git push -q --mirror {}\n",
            mirror.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let creds = dir.join("users");
    std::fs::write(&creds, format!("{}\n", credentials_line("alice", "s3cret"))).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pyaml = primary_yaml(dir, &k, "")
        .replace("rescanInterval: 500ms", "rescanInterval: 1h")
        .replace(
            "forge: { embedded: { anonymousRead: true } }",
            &format!(
                "forge: {{ embedded: {{ anonymousRead: true, credentialsFile: \"{}\" }} }}",
                creds.display()
            ),
        );
    let p = Sidecar::start(dir, "primary", &pyaml);
    let s = Sidecar::start(dir, "secondary", &secondary_yaml(dir, &k, &p.url(), ""));
    wait_synced(s.admin, &k.secondary, "repos", 2, TIMEOUT);

    let measure = |repo: &str, done: &dyn Fn(&str) -> bool| -> Vec<f64> {
        let work = tempfile::tempdir().unwrap();
        let url = format!("http://alice:s3cret@127.0.0.1:{}/g/{repo}", p.service);
        git(work.path(), &["clone", "-q", &url, "w"]);
        let w = work.path().join("w");
        let mut lat = vec![];
        for i in 0..pushes {
            std::fs::write(w.join("file.txt"), format!("{repo} {i}\n")).unwrap();
            git(&w, &["commit", "-q", "-am", &format!("{i}")]);
            let head = git(&w, &["rev-parse", "HEAD"]).trim().to_string();
            let t0 = Instant::now();
            let out = git_cmd(&w)
                .args(["push", "-q", "origin", "HEAD:main"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // A fine poll: the interval bounds the latency's resolution.
            let replicated = poll_until(Duration::from_secs(60), Duration::from_millis(2), || {
                done(&head).then_some(())
            });
            assert!(replicated.is_some(), "push {i} not replicated");
            lat.push(t0.elapsed().as_secs_f64());
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        lat
    };
    let replica = s_repos(dir).join("g/geo.git");
    let geo = measure("geo.git", &|head: &str| {
        registry_row(dir, "repos", "g/geo.git").is_some_and(|r| r.0 == 2)
            && git_cmd(&replica)
                .args(["-c", "safe.directory=*", "rev-parse", "refs/heads/main"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == head)
    });
    let hook = measure("hook.git", &|head: &str| {
        git_cmd(&mirror)
            .args(["rev-parse", "refs/heads/main"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == head)
    });
    for (name, l) in [("geoforge", &geo), ("post_receive_mirror", &hook)] {
        println!(
            "RESULT push_to_synced {name} pushes={pushes} p50_ms={:.0} p99_ms={:.0} max_ms={:.0}",
            percentile(l, 0.5) * 1000.0,
            percentile(l, 0.99) * 1000.0,
            l.last().unwrap() * 1000.0
        );
    }
}

/// Backfill of many small blobs (1 KiB) into an empty secondary; the rsync peer runs in the
/// script over the same tree (`GEO_BENCH_BLOB_TREE`).
#[test]
#[ignore = "benchmark: run bench/replication.sh"]
fn bench_backfill_small_blobs() {
    let tree = std::env::var("GEO_BENCH_BLOB_TREE").expect("GEO_BENCH_BLOB_TREE");
    let tree = Path::new(&tree);
    let n = env_num("GEO_BENCH_BLOBS", 100_000);
    let tmp = work_dir();
    let dir = tmp.path();
    let k = keys(dir);
    std::fs::create_dir_all(dir.join("p-storage")).unwrap();
    // The primary serves the tree in place (a symlinked source root).
    std::os::unix::fs::symlink(tree, p_blobs(dir)).unwrap();
    let conc = env_num("GEO_BENCH_CONCURRENCY", 32);
    let pyaml = primary_yaml(dir, &k, "").replace("rescanInterval: 500ms", "rescanInterval: 1h");
    let p = Sidecar::start(dir, "primary", &pyaml);
    // Wait for the primary's catalog.
    let sk = SigningKey::from_pem_file(&k.secondary.kid, &k.secondary.file).unwrap();
    let t_cat = Instant::now();
    wait_until(Duration::from_secs(3600), "the primary's catalog", || {
        let auth = sk.authorization("primary", &TokenData::catalog("blobs"));
        let (code, body) = http(
            &format!("127.0.0.1:{}", p.service),
            "GET",
            "/api/v4/geo/replicables/blobs?limit=1",
            &[("Authorization", &auth)],
            b"",
        )?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        (v["total"].as_u64()? as usize >= n).then_some(())
    });
    println!(
        "RESULT primary_catalog_ready seconds={:.1}",
        t_cat.elapsed().as_secs_f64()
    );
    let syaml = secondary_yaml(dir, &k, &p.url(), "")
        .replace("concurrency: 8", &format!("concurrency: {conc}"));
    let t0 = Instant::now();
    let s = Sidecar::start(dir, "secondary", &syaml);
    wait_synced(
        s.admin,
        &k.secondary,
        "blobs",
        n as i64,
        Duration::from_secs(3600),
    );
    let secs = t0.elapsed().as_secs_f64();
    let m = http(
        &format!("127.0.0.1:{}", s.admin),
        "GET",
        "/-/metrics",
        &[],
        b"",
    )
    .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
    .unwrap_or_default();
    let sample = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    println!(
        "RESULT backfill_sync_duration mean_ms={:.1}",
        1000.0 * sample("geo_sync_duration_seconds_sum{replicable=\"blobs\"}")
            / sample("geo_sync_duration_seconds_count{replicable=\"blobs\"}").max(1.0)
    );
    println!(
        "RESULT backfill geoforge items={n} seconds={secs:.1} items_per_s={:.0} concurrency={conc}",
        n as f64 / secs
    );
    drop(s);
    drop(p);
    // The script deletes it after every run (a big delete slows the next run's file creation).
    if std::env::var_os("GEO_BENCH_KEEP").is_some() {
        let _ = tmp.keep();
    }
}
