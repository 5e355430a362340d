//! The binary works as a kubectl plugin: kubectl finds `kubectl-geo` on PATH and runs it for
//! `kubectl geo …`. Needs `kubectl` (no cluster: `keygen` talks to none); skipped without it.

use std::path::Path;
use std::process::Command;

#[test]
fn kubectl_runs_the_plugin() {
    let bin = Path::new(env!("CARGO_BIN_EXE_kubectl-geo"));
    let dir = bin.parent().unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let Ok(list) = Command::new("kubectl")
        .args(["plugin", "list", "--name-only"])
        .env("PATH", &path)
        .output()
    else {
        eprintln!("skipped: kubectl is not on PATH");
        return;
    };
    let names = String::from_utf8_lossy(&list.stdout);
    assert!(
        names.lines().any(|l| l.trim() == "kubectl-geo"),
        "kubectl plugin list: {names}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let out = Command::new("kubectl")
        .args(["geo", "keygen", "--site", "tokyo", "--index", "2"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("name: tokyo-geo-key"), "{text}");
    assert!(text.contains("kid: tokyo.2"), "{text}");
    let help = Command::new("kubectl")
        .args(["geo", "--help"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in ["status", "promote", "keygen", "export-site"] {
        assert!(help.contains(cmd), "{help}");
    }
}
