//! Replication (issue 5) with real sidecar processes, real git and real SQLite: a real
//! primary (embedded forge, Geo API) and a real secondary; protocol edge cases against a
//! scripted fake primary.

mod replication_support;

use geoforge_tests::{POLL_INTERVAL, Sidecar, git, make_bare_repo, poll_until, wait_until};
use replication_support::fake::{self, Fake};
use replication_support::*;
use std::path::Path;
use std::time::Duration;

fn start_pair(
    dir: &Path,
    k: &Keys,
    sec_extra: &str,
    verify: &str,
    sec_geo: &str,
) -> (Sidecar, Sidecar) {
    let p = Sidecar::start(dir, "primary", &primary_yaml(dir, k, ""));
    let s = Sidecar::start(
        dir,
        "secondary",
        &secondary_yaml_v(dir, k, &p.url(), sec_extra, verify, sec_geo),
    );
    (p, s)
}

#[test]
fn backfill_incremental_deletes_selective_sync_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    make_bare_repo(&p_repos(dir).join("group/a.git"), 3);
    make_bare_repo(&p_repos(dir).join("group/b.git"), 1);
    make_bare_repo(&p_repos(dir).join("secret/x.git"), 1);
    for i in 0..5 {
        write_blob(
            &p_blobs(dir),
            &format!("ab/cd/blob{i}"),
            format!("blob {i}").as_bytes(),
        );
    }
    write_blob(&p_blobs(dir), "secret/hidden", b"not for this site");
    let (_p, mut s) = start_pair(
        dir,
        &k,
        "selectiveSync: { exclude: [\"secret/**\"] }",
        "24h",
        "",
    );

    // Initial backfill.
    wait_synced(s.admin, &k.secondary, "repos", 2, TIMEOUT);
    wait_synced(s.admin, &k.secondary, "blobs", 5, TIMEOUT);
    for r in ["group/a.git", "group/b.git"] {
        let want = repo_checksum(&p_repos(dir).join(r)).unwrap();
        assert_eq!(
            repo_checksum(&s_repos(dir).join(r)),
            Some(want.clone()),
            "{r}"
        );
        assert_eq!(registry_row(dir, "repos", r), Some((2, Some(want))));
    }
    for i in 0..5 {
        let id = format!("ab/cd/blob{i}");
        assert_eq!(
            std::fs::read(s_blobs(dir).join(&id)).unwrap(),
            std::fs::read(p_blobs(dir).join(&id)).unwrap()
        );
    }
    // Selective sync: never fetched, no rows.
    assert!(!s_repos(dir).join("secret").exists());
    assert!(!s_blobs(dir).join("secret").exists());
    assert_eq!(registry_row(dir, "repos", "secret/x.git"), None);
    assert_eq!(registry_row(dir, "blobs", "secret/hidden"), None);

    // Status: authenticated, counts, verified; metrics.
    let st = status(s.admin, &k.secondary).unwrap();
    assert_eq!(st.role, "secondary");
    assert!(st.paused.is_none(), "{:?}", st.paused);
    assert!(st.log_id.is_some());
    let r = rep(&st, "repos");
    assert_eq!(
        (r.total, r.synced, r.verified, r.failed, r.pending),
        (2, 2, 2, 0, 0)
    );
    let admin = format!("127.0.0.1:{}", s.admin);
    assert_eq!(
        http(&admin, "GET", "/-/geo/status", &[], b"").unwrap().0,
        401
    );
    let foreign = admin_auth(&k.primary, "secondary");
    assert_eq!(
        http(
            &admin,
            "GET",
            "/-/geo/status",
            &[("Authorization", &foreign)],
            b""
        )
        .unwrap()
        .0,
        401,
        "an admin token signed by another site is refused"
    );
    let metrics =
        String::from_utf8(http(&admin, "GET", "/-/metrics", &[], b"").unwrap().1).unwrap();
    wait_until(TIMEOUT, "metrics", || {
        let m = String::from_utf8(http(&admin, "GET", "/-/metrics", &[], b"")?.1).ok()?;
        m.contains("geo_replicable_synced{replicable=\"blobs\"} 5")
            .then_some(())
    });
    assert!(metrics.contains("geo_sync_duration_seconds"), "{metrics}");

    // Incremental: a push and a new blob.
    commit_to(&p_repos(dir).join("group/a.git"), "pushed later");
    write_blob(&p_blobs(dir), "ef/new", b"new blob");
    let want = repo_checksum(&p_repos(dir).join("group/a.git")).unwrap();
    wait_until(TIMEOUT, "the push to be replicated", || {
        (registry_row(dir, "repos", "group/a.git") == Some((2, Some(want.clone())))).then_some(())
    });
    assert_eq!(repo_checksum(&s_repos(dir).join("group/a.git")), Some(want));
    wait_until(TIMEOUT, "the new blob", || {
        (std::fs::read(s_blobs(dir).join("ef/new")).ok()? == b"new blob").then_some(())
    });

    // Deletes propagate.
    std::fs::remove_dir_all(p_repos(dir).join("group/b.git")).unwrap();
    std::fs::remove_file(p_blobs(dir).join("ab/cd/blob0")).unwrap();
    wait_until(TIMEOUT, "deletes to propagate", || {
        (!s_repos(dir).join("group/b.git").exists()
            && !s_blobs(dir).join("ab/cd/blob0").exists()
            && registry_row(dir, "repos", "group/b.git").is_none()
            && registry_row(dir, "blobs", "ab/cd/blob0").is_none())
        .then_some(())
    });
    wait_synced(s.admin, &k.secondary, "repos", 1, TIMEOUT);
    wait_synced(s.admin, &k.secondary, "blobs", 5, TIMEOUT);

    // The cursor survives a restart; changes made while down arrive after it.
    let before = status(s.admin, &k.secondary).unwrap();
    assert!(before.cursor > 0, "cursor {}", before.cursor);
    let (sp, ap) = (s.service, s.admin);
    assert_eq!(s.terminate(Duration::from_secs(20)), Some(0));
    commit_to(
        &p_repos(dir).join("group/a.git"),
        "while the secondary was down",
    );
    let want = repo_checksum(&p_repos(dir).join("group/a.git")).unwrap();
    let cfg = std::fs::read_to_string(dir.join("secondary.yaml")).unwrap();
    let cfg = cfg.split("\nlisten:").next().unwrap().to_string();
    let s = Sidecar::start_on(dir, "secondary", &cfg, sp, ap);
    let after = status(s.admin, &k.secondary).unwrap();
    assert_eq!(after.log_id, before.log_id);
    assert!(
        after.cursor >= before.cursor,
        "{} < {}",
        after.cursor,
        before.cursor
    );
    wait_until(TIMEOUT, "the push made while down", || {
        (registry_row(dir, "repos", "group/a.git") == Some((2, Some(want.clone())))).then_some(())
    });

    // Tokens never reach the logs.
    let log = s.log();
    assert!(!log.contains("GL-Geo secondary.1:"), "a token was logged");
    assert!(!log.contains("eyJ"), "a JWT was logged");
}

#[test]
fn tampered_replicas_are_caught_by_verification_and_resynced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    make_bare_repo(&p_repos(dir).join("t.git"), 2);
    write_blob(&p_blobs(dir), "x/1", b"original one");
    write_blob(&p_blobs(dir), "x/2", b"original two");
    let (_p, s) = start_pair(dir, &k, "", "1s", "");
    wait_synced(s.admin, &k.secondary, "repos", 1, TIMEOUT);
    wait_synced(s.admin, &k.secondary, "blobs", 2, TIMEOUT);

    // Tamper: overwrite a blob, add a ref to the replica.
    std::fs::write(s_blobs(dir).join("x/1"), b"tampered!").unwrap();
    let replica = s_repos(dir).join("t.git");
    let head = git(
        &replica,
        &["-c", "safe.directory=*", "rev-parse", "refs/heads/main"],
    );
    git(
        &replica,
        &[
            "-c",
            "safe.directory=*",
            "update-ref",
            "refs/heads/evil",
            head.trim(),
        ],
    );
    let want = repo_checksum(&p_repos(dir).join("t.git")).unwrap();
    assert_ne!(repo_checksum(&replica), Some(want.clone()));

    wait_until(TIMEOUT, "verification to restore the blob", || {
        (std::fs::read(s_blobs(dir).join("x/1")).ok()? == b"original one").then_some(())
    });
    // A fetch --prune removes the extra ref.
    wait_until(TIMEOUT, "verification to restore the repository", || {
        (repo_checksum(&replica)? == want).then_some(())
    });
    wait_synced(s.admin, &k.secondary, "blobs", 2, TIMEOUT);
    wait_synced(s.admin, &k.secondary, "repos", 1, TIMEOUT);
    assert!(
        s.log().contains("verification found replicas differing"),
        "{}",
        s.log()
    );
}

#[test]
fn mass_deletes_pause_until_confirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    for i in 0..8 {
        write_blob(&p_blobs(dir), &format!("m/{i}"), format!("m{i}").as_bytes());
    }
    let (_p, s) = start_pair(dir, &k, "", "24h", ", deleteMin: 3, deletePercent: 10");
    wait_synced(s.admin, &k.secondary, "blobs", 8, TIMEOUT);
    for i in 0..6 {
        std::fs::remove_file(p_blobs(dir).join(format!("m/{i}"))).unwrap();
    }
    let paused = wait_until(TIMEOUT, "deletes to pause", || {
        let st = status(s.admin, &k.secondary)?;
        let p = rep(&st, "blobs").deletes_paused.clone()?;
        (p.count == 6).then_some(p)
    });
    // Nothing deleted yet.
    for i in 0..8 {
        assert!(s_blobs(dir).join(format!("m/{i}")).exists());
    }
    let admin = format!("127.0.0.1:{}", s.admin);
    let path = format!("/-/geo/confirm-deletes?window_id={}", paused.window_id);
    assert_eq!(http(&admin, "POST", &path, &[], b"").unwrap().0, 401);
    let auth = admin_auth(&k.secondary, "secondary");
    assert_eq!(
        http(
            &admin,
            "POST",
            "/-/geo/confirm-deletes?window_id=nope",
            &[("Authorization", &auth)],
            b""
        )
        .unwrap()
        .0,
        404
    );
    let (code, body) = http(&admin, "POST", &path, &[("Authorization", &auth)], b"").unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    wait_synced(s.admin, &k.secondary, "blobs", 2, TIMEOUT);
    for i in 0..6 {
        assert!(!s_blobs(dir).join(format!("m/{i}")).exists());
    }
    assert!(s_blobs(dir).join("m/7").exists());
    let st = status(s.admin, &k.secondary).unwrap();
    assert!(rep(&st, "blobs").deletes_paused.is_none());
}

// ---- against the scripted fake primary ------------------------------------------------------

fn start_on_fake(dir: &Path, k: &Keys, f: &Fake, geo: &str) -> Sidecar {
    Sidecar::start(
        dir,
        "secondary",
        &secondary_yaml_v(dir, k, &f.url(), "", "24h", geo),
    )
}

#[test]
fn file_not_found_backs_off_and_a_409_resyncs_the_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    let f = Fake::start();
    f.with(|s| {
        s.blobs.insert("a".into(), b"content a".to_vec());
        s.blobs
            .insert("gone".into(), b"listed but missing".to_vec());
        s.missing.push("gone".into());
    });
    let s = start_on_fake(dir, &k, &f, "");
    wait_until(TIMEOUT, "a synced, gone failed", || {
        let a = registry_row(dir, "blobs", "a")?;
        let g = registry_row(dir, "blobs", "gone")?;
        (a.0 == 2 && g.0 == 3).then_some(())
    });
    let why = registry_text(
        dir,
        "SELECT last_sync_failure FROM registry WHERE item_id = 'gone'",
    )
    .unwrap();
    assert!(why.contains("FILE_NOT_FOUND"), "{why}");
    let wait = registry_text(
        dir,
        "SELECT CAST(retry_at - strftime('%s','now') AS TEXT) FROM registry WHERE item_id = 'gone'",
    )
    .unwrap();
    assert!(wait.parse::<i64>().unwrap() >= 10, "retry in {wait}s");
    // No hot loop: over a few status reports, still one attempt.
    let reports = f.with(|s| s.status_reports);
    wait_until(TIMEOUT, "two more status reports", || {
        (f.with(|s| s.status_reports) >= reports + 2).then_some(())
    });
    assert_eq!(
        f.with(|s| s.retrieves.iter().filter(|r| r.0 == "gone").count()),
        1
    );

    // 409: the event names a version the primary no longer has. (First contact with the log
    // must be over: the first page only moves the cursor to the head, covered by the catalog,
    // and `d` is deliberately not in the catalog.)
    wait_until(TIMEOUT, "first contact with the event log", || {
        status(s.admin, &k.secondary)?.log_id.map(|_| ())
    });
    let old = b"version one".to_vec();
    let new = b"version two".to_vec();
    f.with(|s| {
        s.unlisted.push("d".into());
        s.blobs.insert("d".into(), new.clone());
    });
    f.event(fake::Created, "d", Some(sha256(&old)));
    let synced = poll_until(TIMEOUT, POLL_INTERVAL, || {
        (registry_row(dir, "blobs", "d") == Some((2, Some(sha256(&new))))).then_some(())
    });
    assert!(
        synced.is_some(),
        "d not synced at the new version: row {:?}, retrieves {:?}\n{}",
        registry_row(dir, "blobs", "d"),
        f.with(|s| s.retrieves.clone()),
        s.log()
    );
    assert_eq!(std::fs::read(s_blobs(dir).join("d")).unwrap(), new);
    let seen = f.with(|s| {
        s.retrieves
            .iter()
            .filter(|r| r.0 == "d")
            .map(|r| (r.1.clone(), r.2))
            .collect::<Vec<_>>()
    });
    assert_eq!(seen.first(), Some(&(sha256(&old), 409)), "{seen:?}");
    assert_eq!(seen.last(), Some(&(sha256(&new), 200)), "{seen:?}");
    drop(s);
}

#[test]
fn an_event_mid_sync_discards_the_stale_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    let f = Fake::start();
    let (a, b) = (b"old bytes".to_vec(), b"new bytes".to_vec());
    f.with(|s| {
        s.blobs.insert("m".into(), a.clone());
        s.gate = Some(("m".into(), sha256(&a), a.clone()));
    });
    let s = start_on_fake(dir, &k, &f, "");
    wait_until(TIMEOUT, "the first worker to be mid-sync", || {
        f.with(|s| s.gate_waiting).then_some(())
    });
    // The primary changes: a newer event arrives while the first worker is still transferring.
    f.with(|s| {
        s.blobs.insert("m".into(), b.clone());
    });
    f.event(fake::Updated, "m", Some(sha256(&b)));
    wait_until(TIMEOUT, "the newer version synced", || {
        (registry_row(dir, "blobs", "m")? == (2, Some(sha256(&b)))).then_some(())
    });
    // Now the stale worker gets its (old, self-consistent) bytes.
    f.with(|s| s.gate_open = true);
    wait_until(TIMEOUT, "the stale result to be discarded", || {
        s.log().contains("sync result discarded").then_some(())
    });
    assert_eq!(std::fs::read(s_blobs(dir).join("m")).unwrap(), b);
    assert_eq!(registry_row(dir, "blobs", "m"), Some((2, Some(sha256(&b)))));
    // No temporary file left behind by the stale worker.
    let leftovers: Vec<_> = std::fs::read_dir(s_blobs(dir))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".geo-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn log_id_change_and_410_move_the_cursor_then_backfill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    let f = Fake::start();
    f.with(|s| {
        s.blobs.insert("a".into(), b"a".to_vec());
    });
    let n = f.event(fake::Created, "a", Some(sha256(b"a")));
    let s = start_on_fake(dir, &k, &f, "");
    wait_until(TIMEOUT, "a synced", || {
        (registry_row(dir, "blobs", "a")?.0 == 2).then_some(())
    });
    let st = status(s.admin, &k.secondary).unwrap();
    assert_eq!(st.log_id.as_deref(), Some("log-1"));
    assert_eq!(st.cursor, n);

    // The log is recreated (restore): new log_id, an item that no event mentions.
    let catalogs = f.with(|s| {
        s.log_id = "log-2".into();
        s.events.clear();
        s.oldest_id = 0;
        s.blobs.insert("e".into(), b"e".to_vec());
        s.catalog_requests
    });
    wait_until(TIMEOUT, "backfill after the new log_id", || {
        (registry_row(dir, "blobs", "e")?.0 == 2).then_some(())
    });
    assert!(f.with(|s| s.catalog_requests) > catalogs);
    let st = status(s.admin, &k.secondary).unwrap();
    assert_eq!(st.log_id.as_deref(), Some("log-2"));

    // 410: events pruned past the cursor. Cursor to the head first, then backfill.
    f.with(|s| {
        s.oldest_id = 50;
        s.blobs.insert("g".into(), b"g".to_vec());
    });
    wait_until(TIMEOUT, "backfill after 410", || {
        (registry_row(dir, "blobs", "g")?.0 == 2).then_some(())
    });
    wait_until(TIMEOUT, "cursor at the head", || {
        (status(s.admin, &k.secondary)?.cursor == 50).then_some(())
    });
    // Events after the head are consumed normally.
    f.with(|s| {
        s.blobs.insert("h".into(), b"h".to_vec());
    });
    let id = f.event(fake::Created, "h", Some(sha256(b"h")));
    assert_eq!(id, 51);
    wait_until(TIMEOUT, "h synced from its event", || {
        (registry_row(dir, "blobs", "h")?.0 == 2).then_some(())
    });
    wait_until(TIMEOUT, "cursor 51", || {
        (status(s.admin, &k.secondary)?.cursor == 51).then_some(())
    });
}

#[test]
fn another_major_api_version_is_refused_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(dir);
    let f = Fake::start();
    f.with(|s| {
        s.version = "2.0".into();
        s.blobs.insert("a".into(), b"a".to_vec());
    });
    let s = start_on_fake(dir, &k, &f, "");
    let st = wait_until(TIMEOUT, "paused for the version", || {
        let st = status(s.admin, &k.secondary)?;
        st.paused
            .as_deref()?
            .contains("Geo API version 2.0")
            .then_some(st)
    });
    assert_eq!(rep(&st, "blobs").total, 0);
    assert!(f.with(|s| s.retrieves.is_empty()));
    // Back to a compatible version: replication resumes.
    f.with(|s| s.version = "1.3".into());
    wait_until(TIMEOUT, "a synced after the primary's upgrade", || {
        (registry_row(dir, "blobs", "a")?.0 == 2).then_some(())
    });
    assert!(status(s.admin, &k.secondary).unwrap().paused.is_none());
}
