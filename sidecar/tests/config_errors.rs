//! A bad config exits with status 2 and one line naming the file and the field — never a panic.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_geo-sidecar");

fn keygen(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("site.key");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (key, public)
}

fn config(key: &Path, extra: &str) -> String {
    format!(
        "siteId: tokyo\nrole: secondary\nexternalUrl: https://git.tokyo.example\nstateDir: /tmp/x\nstorageRoot: /tmp/y\n\
         primary: {{ staticUrl: 'https://geo.paris.example' }}\nkeys: {{ kid: tokyo.1, privateKeyFile: {} }}\n{extra}",
        key.display()
    )
}

fn check(dir: &Path, text: &str) -> (i32, String) {
    let file = dir.join("sidecar.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&file)
        .env_remove("GEO_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn keygen_writes_a_private_file_and_prints_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(public.len(), 43);
    assert!(geoforge_crds::auth::decode_public_key(&public).is_ok());
    // Refuses to overwrite an existing key.
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_good_config_checks_ok() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path());
    let (code, err) = check(dir.path(), &config(&key, ""));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_configs_exit_2_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path());
    let cases: Vec<(String, &str)> = vec![
        (config(&key, "colour: blue\n"), "colour"),
        (config(&key, "maxStaleness: 5 minutes\n"), "maxStaleness"),
        (
            config(&key, "proxy: { maxConnections: many }\n"),
            "maxConnections",
        ),
        (
            config(&key, "").replace("externalUrl: https://git.tokyo.example\n", ""),
            "externalUrl",
        ),
        (
            config(&key, "").replace("https://geo.paris.example", "http://geo.paris.example"),
            "primary.staticUrl",
        ),
        (
            config(&dir.path().join("missing.key"), ""),
            "keys.privateKeyFile",
        ),
        (
            config(&key, "role: primary\n").replace("role: secondary\n", ""),
            "forge",
        ),
    ];
    for (text, field) in cases {
        let (code, err) = check(dir.path(), &text);
        assert_eq!(code, 2, "expected exit 2 for {field}: {err}");
        assert!(err.contains(field), "message should name {field}: {err}");
        assert!(
            err.contains("sidecar.yaml"),
            "message should name the file: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn world_readable_key_is_refused_but_group_readable_symlink_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = check(dir.path(), &config(&key, ""));
    assert_eq!(code, 2);
    assert!(
        err.contains("keys.privateKeyFile") && err.contains("readable by everyone"),
        "{err}"
    );
    // Kubernetes mounts Secrets as group-readable files behind symlinks.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let (code, err) = check(dir.path(), &config(&link, ""));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn help_describes_every_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--config",
        "--listen",
        "--admin-listen",
        "--log-level",
        "--instance",
        "keygen",
        "check",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}: {text}");
    }
}
