//! Secondary read acceleration with the real `git` CLI against real sidecars (issue 6):
//! what is served from the replica is asserted through the sidecar's counters, not timing.

use geoforge_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const SERVED: &str = "geo_accel_served_locally_total{route=\"git_upload_pack\"}";

struct Sites {
    dir: tempfile::TempDir,
    primary: Sidecar,
    secondary: Sidecar,
    /// The primary's repository root (bare repositories, `<group>/<name>.git`).
    repos: PathBuf,
}

/// A primary (embedded forge; `demo/hello.git` public, `private/secret.git` for users alice
/// and bob) and a secondary replicating it, both synced.
fn sites(push_redirect: &str, rescan: &str) -> Sites {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pk = site_key(d, "paris");
    let sk = site_key(d, "tokyo");
    let repos = d.join("primary/data/repositories");
    make_bare_repo(&repos.join("demo/hello.git"), 3);
    make_bare_repo(&repos.join("private/secret.git"), 2);
    std::fs::create_dir_all(d.join("secondary/data")).unwrap();
    let users = d.join("users");
    std::fs::write(
        &users,
        format!(
            "{}\n{}\n",
            credentials_line("alice", "wonderland"),
            credentials_line("bob", "builder")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    let reps = r#"replicables:
  - { name: repos, type: repository, sourcePath: repositories, include: ["**/*.git"] }"#;
    let p_service = free_port();
    let p_admin = free_port();
    let primary_yaml = format!(
        "siteId: paris\nrole: primary\nexternalUrl: http://127.0.0.1:{p_service}\nallowInsecure: true\n\
         stateDir: {d}/primary/state\nstorageRoot: {d}/primary/data\n\
         keys: {{ kid: paris.1, privateKeyFile: {pkf}, trusted: [{{ kid: tokyo.1, publicKey: {spub} }}] }}\n\
         forge: {{ embedded: {{ credentialsFile: {users}, publicRepositories: [demo/hello.git] }} }}\n\
         geo: {{ rescanInterval: {rescan} }}\n{reps}\n",
        d = d.display(),
        pkf = pk.file.display(),
        spub = sk.public,
        users = users.display(),
    );
    let primary = Sidecar::start_on(d, "primary", &primary_yaml, p_service, p_admin);
    let s_service = free_port();
    let secondary_yaml = format!(
        "siteId: tokyo\nrole: secondary\nexternalUrl: http://127.0.0.1:{s_service}\nprimaryExternalUrl: {purl}\n\
         allowInsecure: true\npushRedirect: {push_redirect}\n\
         stateDir: {d}/secondary/state\nstorageRoot: {d}/secondary/data\nprimary: {{ staticUrl: \"{purl}\" }}\n\
         keys: {{ kid: tokyo.1, privateKeyFile: {skf}, trusted: [{{ kid: paris.1, publicKey: {ppub} }}] }}\n{reps}\n",
        d = d.display(),
        purl = primary.url(),
        skf = sk.file.display(),
        ppub = pk.public,
    );
    let secondary = Sidecar::start_on(d, "secondary", &secondary_yaml, s_service, free_port());
    let sites = Sites {
        dir,
        primary,
        secondary,
        repos,
    };
    wait_synced(&sites, "demo/hello.git");
    wait_synced(&sites, "private/secret.git");
    sites
}

fn admin(s: &Sidecar) -> String {
    format!("127.0.0.1:{}", s.admin)
}

/// Waits until the secondary's replica of `repo` has the primary's refs.
fn wait_synced(s: &Sites, repo: &str) {
    let primary_refs = git(
        &s.repos.join(repo),
        &["for-each-ref", "--format=%(refname) %(objectname)"],
    );
    let replica = s.dir.path().join("secondary/data/repositories").join(repo);
    wait_until(WAIT, &format!("{repo} synced to the secondary"), || {
        let out = git_cmd(&replica)
            .args(["for-each-ref", "--format=%(refname) %(objectname)"])
            .output()
            .ok()?;
        (out.status.success() && String::from_utf8_lossy(&out.stdout) == primary_refs).then_some(())
    });
    // The registry row is marked synced after the refs land.
    wait_until(WAIT, "registry synced", || {
        (metric(
            &admin(&s.secondary),
            "geo_replicable_synced{replicable=\"repos\"}",
        ) >= 1.0)
            .then_some(())
    });
}

fn head(repo: &Path) -> String {
    git(repo, &["rev-parse", "HEAD"]).trim().to_string()
}

fn clone(url: &str, dest: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["clone", "-q"];
    args.extend_from_slice(extra);
    args.push(url);
    args.push(dest.to_str().unwrap());
    git_cmd(dest.parent().unwrap())
        .args(&args)
        .output()
        .unwrap()
}

/// Clones `url` and asserts it worked and was served by the replica.
fn clone_served_locally(s: &Sites, url: &str, dest: &Path, extra: &[&str]) {
    let before = metric(&admin(&s.secondary), SERVED);
    let out = clone(url, dest, extra);
    assert!(
        out.status.success(),
        "clone {extra:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.secondary.log()
    );
    let after = metric(&admin(&s.secondary), SERVED);
    assert!(
        after > before,
        "clone {extra:?} was not served locally ({before} → {after})"
    );
}

#[test]
fn clone_fetch_and_pull_are_served_locally() {
    let s = sites("proxy", "1h");
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/demo/hello.git", s.secondary.url());
    let expected = head(&s.repos.join("demo/hello.git"));
    // A new replica is packed with a reachability bitmap, like the forge's repositories.
    let packs = s
        .dir
        .path()
        .join("secondary/data/repositories/demo/hello.git/objects/pack");
    let names: Vec<String> = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with(".bitmap")),
        "no bitmap in {names:?}"
    );

    clone_served_locally(&s, &url, &work.path().join("v2"), &[]);
    assert_eq!(head(&work.path().join("v2")), expected);
    clone_served_locally(
        &s,
        &url,
        &work.path().join("v0"),
        &["-c", "protocol.version=0"],
    );
    assert_eq!(head(&work.path().join("v0")), expected);
    clone_served_locally(&s, &url, &work.path().join("shallow"), &["--depth", "1"]);
    assert_eq!(
        git(
            &work.path().join("shallow"),
            &["rev-list", "--count", "HEAD"]
        )
        .trim(),
        "1"
    );
    clone_served_locally(
        &s,
        &url,
        &work.path().join("partial"),
        &["--filter=blob:none"],
    );
    assert_eq!(head(&work.path().join("partial")), expected);

    // A new commit on the primary, synced, then fetch and pull through the secondary.
    let w = work.path().join("writer");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            s.repos.join("demo/hello.git").to_str().unwrap(),
            w.to_str().unwrap(),
        ],
    );
    std::fs::write(w.join("new.txt"), "new\n").unwrap();
    git(&w, &["add", "new.txt"]);
    git(&w, &["commit", "-q", "-m", "new"]);
    let push_url = format!(
        "http://alice:wonderland@127.0.0.1:{}/demo/hello.git",
        s.primary.service
    );
    git(&w, &["push", "-q", &push_url, "HEAD:main"]);
    wait_synced(&s, "demo/hello.git");
    let new_head = head(&w);
    let before = metric(&admin(&s.secondary), SERVED);
    git(
        &work.path().join("v2"),
        &["pull", "-q", "--ff-only", "origin", "main"],
    );
    assert_eq!(head(&work.path().join("v2")), new_head);
    git(
        &work.path().join("v0"),
        &["-c", "protocol.version=0", "fetch", "-q", "origin"],
    );
    assert_eq!(
        git(&work.path().join("v0"), &["rev-parse", "origin/main"]).trim(),
        new_head
    );
    assert!(
        metric(&admin(&s.secondary), SERVED) >= before + 2.0,
        "pull and fetch served locally"
    );
}

#[test]
fn a_stale_replica_is_bypassed_and_the_client_gets_the_newest_commits() {
    let s = sites("proxy", "1h");
    let work = tempfile::tempdir().unwrap();
    // A commit written straight into the primary's repository: no event, no rescan for an
    // hour, so the replica stays behind.
    let w = work.path().join("writer");
    git(
        work.path(),
        &[
            "clone",
            "-q",
            s.repos.join("demo/hello.git").to_str().unwrap(),
            w.to_str().unwrap(),
        ],
    );
    std::fs::write(w.join("late.txt"), "late\n").unwrap();
    git(&w, &["add", "late.txt"]);
    git(&w, &["commit", "-q", "-m", "late"]);
    git(&w, &["push", "-q", "origin", "HEAD:main"]);
    let before_local = metric(&admin(&s.secondary), SERVED);
    let missing = "geo_accel_proxied_total{reason=\"wants_missing\"}";
    let before_missing = metric(&admin(&s.secondary), missing);
    let dest = work.path().join("clone");
    let out = clone(&format!("{}/demo/hello.git", s.secondary.url()), &dest, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(head(&dest), head(&w), "the client got the newest commit");
    assert_eq!(
        metric(&admin(&s.secondary), SERVED),
        before_local,
        "nothing served from the stale replica"
    );
    assert!(metric(&admin(&s.secondary), missing) > before_missing);
}

#[test]
fn private_repositories_need_the_forges_authorization() {
    let s = sites("proxy", "1h");
    let work = tempfile::tempdir().unwrap();
    let base = format!("127.0.0.1:{}", s.secondary.service);
    let before = metric(&admin(&s.secondary), SERVED);
    // Unauthenticated: the primary says 401, and nothing comes from the replica.
    let r = http_request(
        &base,
        "GET",
        "/private/secret.git/info/refs?service=git-upload-pack",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401);
    let out = clone(
        &format!("http://{base}/private/secret.git"),
        &work.path().join("anon"),
        &[],
    );
    assert!(!out.status.success());
    let out = clone(
        &format!("http://alice:wrong@{base}/private/secret.git"),
        &work.path().join("wrong"),
        &[],
    );
    assert!(!out.status.success());
    assert_eq!(
        metric(&admin(&s.secondary), SERVED),
        before,
        "no local data without authorization"
    );
    clone_served_locally(
        &s,
        &format!("http://alice:wonderland@{base}/private/secret.git"),
        &work.path().join("alice"),
        &[],
    );
}

/// A pkt-line.
fn pkt(s: &str) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s.as_bytes());
    v
}

fn v0_fetch_body(want: &str) -> Vec<u8> {
    let mut b = pkt(&format!("want {want} side-band-64k ofs-delta\n"));
    b.extend_from_slice(b"0000");
    b.extend_from_slice(&pkt("done\n"));
    b
}

#[test]
fn another_client_never_rides_on_an_entry_and_unadvertised_wants_are_proxied() {
    let s = sites("proxy", "1h");
    let base = format!("127.0.0.1:{}", s.secondary.service);
    let tip = head(&s.repos.join("private/secret.git"));
    let alice = "Basic YWxpY2U6d29uZGVybGFuZA=="; // alice:wonderland
    // alice is authorized: her info/refs creates her entry.
    let r = http_request(
        &base,
        "GET",
        "/private/secret.git/info/refs?service=git-upload-pack",
        &[("Authorization", alice)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    // An anonymous client sending alice's wants rides on nothing: proxied, and the primary refuses.
    let served = metric(&admin(&s.secondary), SERVED);
    let no_auth = "geo_accel_proxied_total{reason=\"no_authorization\"}";
    let before = metric(&admin(&s.secondary), no_auth);
    let r = http_request(
        &base,
        "POST",
        "/private/secret.git/git-upload-pack",
        &[("Content-Type", "application/x-git-upload-pack-request")],
        &v0_fetch_body(&tip),
    )
    .unwrap();
    assert_eq!(r.status, 401);
    assert!(metric(&admin(&s.secondary), no_auth) > before);
    assert_eq!(metric(&admin(&s.secondary), SERVED), served);

    // A commit the primary no longer advertises (force-pushed away) is not served, though the
    // replica still has the object.
    let old = git(
        &s.repos.join("private/secret.git"),
        &["rev-parse", "HEAD~1"],
    )
    .trim()
    .to_string();
    let not_adv = "geo_accel_proxied_total{reason=\"want_not_advertised\"}";
    let before = metric(&admin(&s.secondary), not_adv);
    let r = http_request(
        &base,
        "GET",
        "/private/secret.git/info/refs?service=git-upload-pack",
        &[("Authorization", alice)],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let _ = http_request(
        &base,
        "POST",
        "/private/secret.git/git-upload-pack",
        &[
            ("Content-Type", "application/x-git-upload-pack-request"),
            ("Authorization", alice),
        ],
        &v0_fetch_body(&old),
    )
    .unwrap();
    assert!(metric(&admin(&s.secondary), not_adv) > before);
    assert_eq!(
        metric(&admin(&s.secondary), SERVED),
        served,
        "an unadvertised want is never served locally"
    );
}

fn push_through_secondary(mode: &str) {
    let s = sites(mode, "1h");
    let work = tempfile::tempdir().unwrap();
    let base = format!("127.0.0.1:{}", s.secondary.service);
    let w = work.path().join("w");
    let out = clone(&format!("http://{base}/demo/hello.git"), &w, &[]);
    assert!(out.status.success());
    std::fs::write(w.join("pushed.txt"), mode).unwrap();
    git(&w, &["add", "pushed.txt"]);
    git(&w, &["commit", "-q", "-m", &format!("push via {mode}")]);
    // Credentials come from a helper, as a user's credential store would answer for either
    // host (`separate` redirects the push to the primary's own URL).
    let out = git_cmd(&w)
        .args([
            "-c",
            "credential.helper=!f() { echo username=alice; echo password=wonderland; }; f",
            "push",
            &format!("http://{base}/demo/hello.git"),
            "HEAD:main",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push ({mode}) failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.secondary.log()
    );
    assert_eq!(
        head(&s.repos.join("demo/hello.git")),
        head(&w),
        "the push landed on the primary"
    );
    // Read-your-writes: the secondary syncs the repository and then serves it.
    wait_synced(&s, "demo/hello.git");
    let dest = work.path().join("after");
    clone_served_locally(&s, &format!("http://{base}/demo/hello.git"), &dest, &[]);
    assert_eq!(head(&dest), head(&w));
}

#[test]
fn push_through_the_secondary_proxy_mode() {
    push_through_secondary("proxy");
}

#[test]
fn push_through_the_secondary_unified_redirect() {
    push_through_secondary("unified");
}

#[test]
fn push_through_the_secondary_separate_redirect() {
    push_through_secondary("separate");
}

#[test]
fn with_the_primary_down_cached_clients_still_clone_and_others_get_503() {
    let mut s = sites("proxy", "1h");
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/demo/hello.git", s.secondary.url());
    clone_served_locally(&s, &url, &work.path().join("first"), &[]);
    s.primary.kill9();
    clone_served_locally(&s, &url, &work.path().join("again"), &[]);
    assert_eq!(
        head(&work.path().join("again")),
        head(&work.path().join("first"))
    );
    // Another client (other credentials) has no entry: 503 with Retry-After.
    let base = format!("127.0.0.1:{}", s.secondary.service);
    let r = http_request(
        &base,
        "GET",
        "/demo/hello.git/info/refs?service=git-upload-pack",
        &[("Authorization", "Basic Ym9iOmJ1aWxkZXI=")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
}
