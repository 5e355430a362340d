//! The site's key Secret: created once, never owned, never rewritten.
//!
//! Deleting and recreating a `GeoSite` (a GitOps prune) must not change the site's identity,
//! so this Secret carries **no** owner reference and the operator only ever creates it.

use super::configmap::PRIVATE_KEY_FILE;
use super::{KEY_LABEL, SiteKey, key_secret_name, labels};
use geoforge_crds::GeoSite;
use geoforge_crds::auth::{GeneratedKey, SigningKey};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Secret key holding the key id.
pub const KID_KEY: &str = "kid";
/// Secret key holding the base64url public key.
pub const PUBLIC_KEY_KEY: &str = "public-key";

/// The key id of a site's first key.
pub fn first_kid(site: &str) -> String {
    format!("{site}.1")
}

/// A new key Secret for `site` holding `key` (no owner reference, by design).
pub fn key_secret(site: &GeoSite, key: &GeneratedKey) -> Secret {
    let name = site.name_any();
    let mut l = labels(&name);
    l.insert(KEY_LABEL.into(), "true".into());
    Secret {
        metadata: ObjectMeta {
            name: Some(key_secret_name(&name)),
            namespace: site.namespace(),
            labels: Some(l),
            annotations: Some(BTreeMap::from([(
                "geoforge.dev/note".into(),
                "The identity of this Geo site. Not owned by the GeoSite on purpose: keep it \
                 when the GeoSite is deleted and recreated."
                    .into(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (KID_KEY.into(), ByteString(first_kid(&name).into_bytes())),
            (
                PRIVATE_KEY_FILE.into(),
                ByteString(key.private_pem.clone().into_bytes()),
            ),
            (
                PUBLIC_KEY_KEY.into(),
                ByteString(key.public_key.clone().into_bytes()),
            ),
        ])),
        immutable: Some(true),
        ..Secret::default()
    }
}

/// Reads a key Secret: the signing key and its public half. The public key is derived from
/// the private key, so a hand-edited `public-key` entry can never disagree with what signs.
pub fn read_key_secret(secret: &Secret) -> Result<(SigningKey, SiteKey), String> {
    let data = secret.data.as_ref().ok_or("the Secret has no data")?;
    let get = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .ok_or_else(|| format!("the Secret has no {k:?} entry"))
    };
    let kid = get(KID_KEY)?;
    let pem = get(PRIVATE_KEY_FILE)?;
    let signing = SigningKey::from_pem(&kid, &pem)?;
    let public_key = signing
        .public_key
        .clone()
        .ok_or("the private key has no public half")?;
    Ok((signing, SiteKey { kid, public_key }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;

    #[test]
    fn golden_key_secret_shape() {
        let key = geoforge_crds::auth::generate_key();
        let mut s = serde_json::to_value(key_secret(&paris(), &key)).unwrap();
        // The key material is random; the golden file fixes everything else.
        s["data"][PRIVATE_KEY_FILE] = "<private>".into();
        s["data"][PUBLIC_KEY_KEY] = "<public>".into();
        assert_golden("secret-paris", &s);
    }

    #[test]
    fn key_secret_has_no_owner_and_round_trips() {
        let key = geoforge_crds::auth::generate_key();
        let secret = key_secret(&paris(), &key);
        assert!(secret.metadata.owner_references.is_none());
        let (signing, site_key) = read_key_secret(&secret).unwrap();
        assert_eq!(site_key.kid, "paris.1");
        assert_eq!(site_key.public_key, key.public_key);
        assert_eq!(signing.kid, "paris.1");
    }

    #[test]
    fn malformed_key_secret_is_an_error() {
        let key = geoforge_crds::auth::generate_key();
        let mut secret = key_secret(&paris(), &key);
        secret
            .data
            .as_mut()
            .unwrap()
            .insert(PRIVATE_KEY_FILE.into(), ByteString(b"garbage".to_vec()));
        assert!(read_key_secret(&secret).is_err());
        secret.data.as_mut().unwrap().remove(KID_KEY);
        assert!(read_key_secret(&secret).unwrap_err().contains("kid"));
    }
}
