//! The committed CRD manifests match the types, the CRDs have the shape the API server
//! expects, and the examples are accepted or refused as documented.

use geoforge_crds::{GeoSite, Replicable, crd_manifests};
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_manifests_match_the_types() {
    for (name, yaml) in crd_manifests() {
        let path = root().join("crds").join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == yaml,
            "{} is out of date: run `cargo run -p geo-operator --bin crdgen` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_have_status_printer_columns_and_names() {
    // crd() panics on schema shapes Kubernetes rejects; call it for both kinds.
    let gs = GeoSite::crd();
    let rep = Replicable::crd();
    assert_eq!(gs.spec.group, "geoforge.dev");
    assert_eq!(
        gs.spec.names.short_names.as_deref(),
        Some(&["gs".to_string()][..])
    );
    assert_eq!(
        rep.spec.names.short_names.as_deref(),
        Some(&["rep".to_string()][..])
    );
    for crd in [&gs, &rep] {
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["geoforge".to_string()][..])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
    }
    let cols = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.to_uppercase(), c.json_path.clone()))
            .collect::<Vec<_>>()
    };
    let gs_cols = cols(&gs);
    assert_eq!(
        gs_cols.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["ROLE", "URL", "READY", "AGE"]
    );
    let rep_cols = cols(&rep);
    assert_eq!(
        rep_cols.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["TYPE", "SYNCED", "FAILED", "VERIFIED", "AGE"]
    );
    assert!(rep_cols[1].1.starts_with(".status.summary."));

    // Conditions are a list map keyed by type, with the convention's fields.
    let schema = serde_json::to_value(&gs.spec.versions[0].schema).unwrap();
    let conds = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conds["x-kubernetes-list-type"], "map");
    assert_eq!(
        conds["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let props = conds["items"]["properties"].as_object().unwrap();
    for f in [
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    ] {
        assert!(props.contains_key(f), "condition field {f}");
    }
}

/// Every list and string a CEL rule walks has a bound, so the API server can estimate its cost.
#[test]
fn cel_walked_values_are_bounded() {
    fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
        if let Some(obj) = v.as_object() {
            if obj.get("type") == Some(&Value::String("array".into()))
                && obj.contains_key("x-kubernetes-validations")
            {
                if !obj.contains_key("maxItems") {
                    out.push(format!("{path}: array with a rule but no maxItems"));
                }
                if obj["items"].get("type") == Some(&Value::String("string".into()))
                    && !obj["items"].as_object().unwrap().contains_key("maxLength")
                {
                    out.push(format!("{path}: items without maxLength"));
                }
            }
            if obj.get("type") == Some(&Value::String("string".into()))
                && obj.contains_key("x-kubernetes-validations")
                && !obj.contains_key("maxLength")
                && !obj.contains_key("enum")
            {
                out.push(format!("{path}: string with a rule but no maxLength"));
            }
            for (k, child) in obj {
                walk(child, &format!("{path}.{k}"), out);
            }
        }
    }
    let mut problems = vec![];
    for crd in [GeoSite::crd(), Replicable::crd()] {
        walk(
            &serde_json::to_value(&crd.spec.versions[0].schema).unwrap(),
            &crd.spec.names.kind,
            &mut problems,
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema_of(kind: &str) -> Value {
    let crd = match kind {
        "GeoSite" => GeoSite::crd(),
        "Replicable" => Replicable::crd(),
        other => panic!("unknown kind {other}"),
    };
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn valid_examples_deserialize_and_pass_cel() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let obj = load(&path);
        let kind = obj["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "GeoSite" => {
                serde_json::from_value::<GeoSite>(obj.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            "Replicable" => {
                serde_json::from_value::<Replicable>(obj.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            _ => continue,
        }
        if let Err(e) = Validator::new().validate(&schema_of(&kind), &obj, None) {
            panic!("{} fails CEL validation: {e:?}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "expected the four valid examples, saw {seen}");
}

#[test]
fn invalid_examples_are_refused_with_their_message() {
    // file → a phrase of the message the person sees.
    let expected = [
        (
            "role-tertiary.yaml",
            "role must be one of primary, secondary or disabled",
        ),
        (
            "primary-two-replicas.yaml",
            "a primary site runs exactly one replica",
        ),
        ("http-without-allow-insecure.yaml", "must be https:// URLs"),
        (
            "two-forges.yaml",
            "exactly one of embedded, upstream or container",
        ),
        (
            "kid-of-another-site.yaml",
            "must start with the site's name",
        ),
        (
            "empty-include.yaml",
            "include needs at least one non-empty pattern",
        ),
        ("bad-id-template.yaml", "may only use the placeholders"),
    ];
    let dir = root().join("examples/invalid");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files.len(),
        expected.len(),
        "every invalid example has an expected message: {files:?}"
    );
    for (file, phrase) in expected {
        let obj = load(&dir.join(file));
        let kind = obj["kind"].as_str().unwrap();
        let err = Validator::new()
            .validate(&schema_of(kind), &obj, None)
            .expect_err(&format!("{file} must be refused"));
        let text = format!("{err:?}");
        assert!(
            text.contains(phrase),
            "{file}: expected {phrase:?} in {text}"
        );
    }
    // The typed client refuses the unknown role before it reaches the server.
    assert!(serde_json::from_value::<GeoSite>(load(&dir.join("role-tertiary.yaml"))).is_err());
}
