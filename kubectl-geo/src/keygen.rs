//! `kubectl geo keygen`: a new Ed25519 key pair (DESIGN §5), or a site's key Secret manifest in
//! the format the operator reads (`<site>-geo-key` with `kid`, `private.pem`, `public-key`),
//! for sites whose key is managed outside the operator (GitOps with sealed secrets, HSM export).

use geoforge_crds::auth::GeneratedKey;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// Name of a site's key Secret (the operator's convention).
pub fn key_secret_name(site: &str) -> String {
    format!("{site}-geo-key")
}

/// The key Secret for `site` with key id `kid` (no owner reference: a site's identity outlives
/// its `GeoSite`).
pub fn key_secret(site: &str, namespace: Option<&str>, kid: &str, key: &GeneratedKey) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(key_secret_name(site)),
            namespace: namespace.map(str::to_string),
            labels: Some(BTreeMap::from([
                ("geoforge.dev/site".into(), site.into()),
                ("geoforge.dev/key".into(), "true".into()),
                ("app.kubernetes.io/part-of".into(), "geoforge".into()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            ("kid".into(), kid.into()),
            ("private.pem".into(), key.private_pem.clone()),
            ("public-key".into(), key.public_key.clone()),
        ])),
        immutable: Some(true),
        ..Secret::default()
    }
}

/// Output of `keygen --site S`: the Secret, then (as comments) the `publicKeys` entry to add
/// to the site's `GeoSite` in every cluster.
pub fn secret_manifest(
    site: &str,
    namespace: Option<&str>,
    index: u32,
    key: &GeneratedKey,
) -> anyhow::Result<String> {
    let kid = format!("{site}.{index}");
    let secret = key_secret(site, namespace, &kid, key);
    let mut out = format!(
        "# Key Secret of GeoSite {site}. Apply it in {site}'s cluster only, before the GeoSite\n\
         # (the operator creates one only when absent), and keep it out of version control.\n\
         # Then add to spec.publicKeys of GeoSite {site} in every cluster:\n\
         #   - {{ kid: {kid}, key: {} }}\n",
        key.public_key
    );
    out.push_str(&serde_saphyr::to_string(&secret)?);
    Ok(out)
}

/// Output of `keygen` without a site: the private key PEM and the public key.
pub fn plain(key: &GeneratedKey) -> String {
    format!(
        "# Ed25519 key pair. Public key (base64url, for spec.publicKeys): {}\n{}",
        key.public_key, key.private_pem
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use geoforge_crds::auth::{SigningKey, decode_public_key, generate_key};

    #[test]
    fn secret_manifest_round_trips_to_a_usable_key() {
        let key = generate_key();
        let yaml = secret_manifest("tokyo", Some("geo-tokyo"), 2, &key).unwrap();
        assert!(yaml.contains(&format!(
            "#   - {{ kid: tokyo.2, key: {} }}",
            key.public_key
        )));
        let secret: Secret = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("tokyo-geo-key"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("geo-tokyo"));
        assert_eq!(secret.immutable, Some(true));
        let data = secret.string_data.unwrap();
        assert_eq!(data["kid"], "tokyo.2");
        let signing = SigningKey::from_pem("tokyo.2", &data["private.pem"]).unwrap();
        assert_eq!(
            signing.public_key.as_deref(),
            Some(data["public-key"].as_str())
        );
        decode_public_key(&data["public-key"]).unwrap();
    }

    #[test]
    fn plain_output_holds_pem_and_public_key() {
        let key = generate_key();
        let out = plain(&key);
        assert!(out.contains(&key.public_key));
        assert!(out.contains("-----BEGIN PRIVATE KEY-----"));
        let pem: String = out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let s = SigningKey::from_pem("x.1", &pem).unwrap();
        assert_eq!(s.public_key.as_deref(), Some(key.public_key.as_str()));
    }
}
