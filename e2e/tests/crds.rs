//! Issue 2 on a real API server: the CRD manifests install both ways, the examples are
//! accepted with their printer columns, and every invalid example is refused with its message.

use geoforge_e2e::{install_crds, kubectl, kubectl_ok, root};

const NEEDS_CLUSTER: &str = "needs a cluster: set KUBECONFIG, run with --ignored";

fn require_cluster() {
    assert!(std::env::var_os("KUBECONFIG").is_some(), "{NEEDS_CLUSTER}");
}

/// file → phrase of the refusal (the CEL messages of crds/src/geosite.rs and replicable.rs,
/// as crds/tests/manifests.rs lists them). `role-tertiary` may instead be refused by the
/// schema's enum before CEL runs ("Unsupported value").
const INVALID: &[(&str, &[&str])] = &[
    (
        "role-tertiary.yaml",
        &[
            "role must be one of primary, secondary or disabled",
            "Unsupported value: \"tertiary\"",
        ],
    ),
    (
        "primary-two-replicas.yaml",
        &["a primary site runs exactly one replica"],
    ),
    (
        "http-without-allow-insecure.yaml",
        &["must be https:// URLs"],
    ),
    (
        "two-forges.yaml",
        &["exactly one of embedded, upstream or container"],
    ),
    (
        "kid-of-another-site.yaml",
        &["must start with the site's name"],
    ),
    (
        "empty-include.yaml",
        &["include needs at least one non-empty pattern"],
    ),
    ("bad-id-template.yaml", &["may only use the placeholders"]),
];

#[test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
fn crds_apply_server_side_and_client_side() {
    require_cluster();
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", "crds/"]).unwrap();
    // Client-side apply stores the whole object in an annotation (256 KiB limit): the CRDs
    // must stay small enough for it.
    let out = kubectl(&["apply", "-f", "crds/"]).unwrap();
    assert!(
        out.status.success(),
        "client-side apply refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = kubectl_ok(&["get", "crd", "-o", "name"]).unwrap();
    assert!(names.contains("customresourcedefinition.apiextensions.k8s.io/geosites.geoforge.dev"));
    assert!(
        names.contains("customresourcedefinition.apiextensions.k8s.io/replicables.geoforge.dev")
    );
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/geosites.geoforge.dev",
        "crd/replicables.geoforge.dev",
    ])
    .unwrap();
}

#[test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
fn valid_examples_are_created_and_printer_columns_show() {
    require_cluster();
    install_crds().unwrap();
    let mut namespaces = vec![];
    let mut files = vec![];
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            if let Some(ns) = line.trim().strip_prefix("namespace:") {
                namespaces.push(ns.trim().to_string());
            }
        }
        files.push(path);
    }
    assert!(files.len() >= 4, "the four valid examples");
    namespaces.sort();
    namespaces.dedup();
    for ns in &namespaces {
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
        let tmp = std::env::temp_dir().join(format!("geoforge-e2e-ns-{ns}.yaml"));
        std::fs::write(&tmp, yaml).unwrap();
        kubectl_ok(&["apply", "-f", tmp.to_str().unwrap()]).unwrap();
    }
    for f in &files {
        let out = kubectl(&["apply", "-f", f.to_str().unwrap()]).unwrap();
        assert!(
            out.status.success(),
            "{} refused: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table = kubectl_ok(&["get", "gs,rep", "-A"]).unwrap();
    for header in [
        "ROLE", "URL", "READY", "TYPE", "SYNCED", "FAILED", "VERIFIED",
    ] {
        assert!(table.contains(header), "no {header} column in:\n{table}");
    }
    for name in ["paris", "tokyo", "repositories", "lfs-objects"] {
        assert!(table.contains(name), "{name} missing in:\n{table}");
    }
    assert!(table.contains("https://git.paris.example.com"));
    // Clean up what this test created.
    for f in &files {
        let _ = kubectl(&["delete", "--ignore-not-found", "-f", f.to_str().unwrap()]);
    }
}

#[test]
#[ignore = "needs a cluster: set KUBECONFIG, run with --ignored"]
fn invalid_examples_are_refused_with_their_message() {
    require_cluster();
    install_crds().unwrap();
    let dir = root().join("examples/invalid");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut listed: Vec<String> = INVALID.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "every invalid example has an expected message"
    );
    for (file, phrases) in INVALID {
        let path = dir.join(file);
        // Server-side dry run: the API server validates (schema + CEL) and stores nothing.
        let out = kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            phrases.iter().any(|p| stderr.contains(p)),
            "{file}: expected one of {phrases:?} in: {stderr}"
        );
    }
}
