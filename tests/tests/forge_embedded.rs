//! `git clone` / `git push` through a primary sidecar's embedded forge (`git http-backend`),
//! with and without basic auth; a push rejected by a hook records no push.

use geoforge_crds::auth::{Scope, SigningKey, TokenData};
use geoforge_tests::{Sidecar, SiteKey, credentials_line, git, git_cmd, make_bare_repo, site_key};
use std::path::Path;

/// A primary with an embedded forge over `<dir>/data/repositories` holding `group/project.git`.
fn primary(dir: &Path, embedded: &str) -> (Sidecar, SiteKey) {
    let key = site_key(dir, "paris");
    let data = dir.join("data");
    make_bare_repo(&data.join("repositories/group/project.git"), 2);
    make_bare_repo(&data.join("repositories/open/public.git"), 1);
    let creds = dir.join("users");
    std::fs::write(&creds, format!("{}\n", credentials_line("alice", "s3cret"))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let yaml = format!(
        r#"siteId: paris
role: primary
externalUrl: http://paris.example.test
allowInsecure: true
stateDir: {state}
storageRoot: {data}
keys: {{ kid: paris.1, privateKeyFile: {key} }}
forge:
  embedded: {{ credentialsFile: {creds}, {embedded} }}
replicables:
  - {{ name: repositories, type: repository, sourcePath: repositories, include: ["**/*.git"] }}
"#,
        state = dir.join("state").display(),
        data = data.display(),
        key = key.file.display(),
        creds = creds.display(),
    );
    (Sidecar::start(dir, "paris", &yaml), key)
}

/// The Geo API's events for `item` (read with the site's own key, as a tool would).
fn item_events(sc: &Sidecar, key: &SiteKey, item: &str) -> Vec<serde_json::Value> {
    let pem = std::fs::read_to_string(&key.file).unwrap();
    let signer = SigningKey::from_pem(&key.kid, &pem).unwrap();
    let auth = signer.authorization("paris", &TokenData::scope(Scope::Events));
    let url = format!("{}/api/v4/geo/events?after=0&limit=1000", sc.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(geoforge_tests::httpd::get(
            &url,
            &[("authorization", auth.as_str())],
        ))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["item_id"] == item)
        .cloned()
        .collect()
}

fn url(sc: &Sidecar, auth: &str, repo: &str) -> String {
    format!("http://{auth}127.0.0.1:{}/{repo}", sc.service)
}

/// Runs git, returning (success, stderr).
fn try_git(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = git_cmd(dir).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// git's ways of saying it got a 401 and may not prompt.
fn needs_auth(stderr: &str) -> bool {
    ["401", "Authentication failed", "could not read Username"]
        .iter()
        .any(|m| stderr.contains(m))
}

fn commit(work: &Path, msg: &str) {
    std::fs::write(work.join("new.txt"), msg).unwrap();
    git(work, &["add", "new.txt"]);
    git(work, &["commit", "-q", "-m", msg]);
}

fn push_events(sc: &Sidecar, repo: &str) -> usize {
    let needle = format!("path=/{repo}/git-receive-pack");
    geoforge_tests::httpd::strip_ansi(&sc.log())
        .lines()
        .filter(|l| l.contains("push completed") && l.contains(&needle))
        .count()
}

#[test]
fn clone_and_push_need_a_user_when_anonymous_read_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let (sc, _key) = primary(
        dir.path(),
        "anonymousRead: false, publicRepositories: [open/public.git]",
    );
    let tmp = dir.path();

    // Anonymous clone of a private repository: refused (401, no prompt).
    let (ok, err) = try_git(
        tmp,
        &["clone", "-q", &url(&sc, "", "group/project.git"), "anon"],
    );
    assert!(!ok, "anonymous clone must fail");
    assert!(needs_auth(&err), "{err}");
    // Wrong password: refused.
    let (ok, _) = try_git(
        tmp,
        &[
            "clone",
            "-q",
            &url(&sc, "alice:wrong@", "group/project.git"),
            "bad",
        ],
    );
    assert!(!ok);
    // A public repository: anonymous clone works.
    git(
        tmp,
        &["clone", "-q", &url(&sc, "", "open/public.git"), "pub"],
    );
    assert!(tmp.join("pub/file.txt").exists());

    // With the user: clone and push.
    git(
        tmp,
        &[
            "clone",
            "-q",
            &url(&sc, "alice:s3cret@", "group/project.git"),
            "work",
        ],
    );
    let work = tmp.join("work");
    assert_eq!(
        std::fs::read_to_string(work.join("file.txt")).unwrap(),
        "content 1\n"
    );
    commit(&work, "pushed through the sidecar");
    git(&work, &["push", "-q", "origin", "main"]);
    let head = git(&work, &["rev-parse", "HEAD"]);
    let bare = tmp.join("data/repositories/group/project.git");
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/main"]), head);
    assert_eq!(push_events(&sc, "group/project.git"), 1, "{}", sc.log());

    // A push larger than git's postBuffer (1 MiB) goes chunked, without Content-Length:
    // streamed to http-backend's stdin.
    let mut noise = Vec::with_capacity(3 << 20);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while noise.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(work.join("big.bin"), &noise).unwrap();
    git(&work, &["add", "big.bin"]);
    git(&work, &["commit", "-q", "-m", "big"]);
    git(&work, &["push", "-q", "origin", "main"]);
    assert_eq!(
        git(&bare, &["rev-parse", "refs/heads/main"]),
        git(&work, &["rev-parse", "HEAD"])
    );
    assert_eq!(push_events(&sc, "group/project.git"), 2);

    // Pushing anonymously to the public repository: refused, nothing recorded.
    commit(&tmp.join("pub"), "anonymous push");
    let (ok, err) = try_git(&tmp.join("pub"), &["push", "-q", "origin", "main"]);
    assert!(!ok, "anonymous push must fail");
    assert!(needs_auth(&err), "{err}");
    assert_eq!(push_events(&sc, "open/public.git"), 0);
}

#[test]
fn anonymous_read_and_hook_rejected_push() {
    let dir = tempfile::tempdir().unwrap();
    let (sc, key) = primary(dir.path(), "anonymousRead: true");
    let tmp = dir.path();
    git(
        tmp,
        &["clone", "-q", &url(&sc, "", "group/project.git"), "anon"],
    );
    let anon = tmp.join("anon");
    commit(&anon, "anonymous");
    let (ok, _) = try_git(&anon, &["push", "-q", "origin", "main"]);
    assert!(!ok, "pushes always need a user");

    // A pre-receive hook that refuses everything: the push fails, no push is recorded.
    let bare = tmp.join("data/repositories/group/project.git");
    let hook = bare.join("hooks/pre-receive");
    std::fs::write(&hook, "#!/bin/sh\necho refused by policy >&2\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    git(
        &anon,
        &[
            "remote",
            "set-url",
            "origin",
            &url(&sc, "alice:s3cret@", "group/project.git"),
        ],
    );
    let (ok, err) = try_git(&anon, &["push", "origin", "main"]);
    assert!(!ok, "the hook rejects the push");
    assert!(err.contains("refused by policy"), "{err}");
    assert_eq!(push_events(&sc, "group/project.git"), 0, "{}", sc.log());
    let before = item_events(&sc, &key, "group/project.git").len();

    // Without the hook the same push goes through and is recorded once.
    std::fs::remove_file(&hook).unwrap();
    git(&anon, &["push", "-q", "origin", "main"]);
    assert_eq!(push_events(&sc, "group/project.git"), 1, "{}", sc.log());
    // The event was durable before `git push` returned.
    let after = item_events(&sc, &key, "group/project.git");
    assert_eq!(after.len(), before + 1, "{after:?}");
    assert_eq!(
        git(&bare, &["rev-parse", "refs/heads/main"]),
        git(&anon, &["rev-parse", "HEAD"])
    );
}
