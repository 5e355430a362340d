//! GL-Geo tokens (DESIGN §5): `Authorization: GL-Geo <kid>:<JWT>`.
//!
//! One implementation for every part: the sidecar mints and verifies Geo API tokens and the
//! proxy extra data, the operator mints `admin` tokens and verifies `proxy-config` tokens.
//! The verifying side decides the algorithm from its trusted key's configuration; the token's
//! header only has to agree. Error messages are one line and never name an item.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{KeyAlgorithm, TrustedKey};

/// Authorization scheme of Geo API calls.
pub const SCHEME: &str = "GL-Geo";
/// Header carrying the secondary's signed extra data on proxied requests.
pub const PROXY_EXTRA_DATA_HEADER: &str = "gitlab-workhorse-geo-proxy-extra-data";
/// Header marking a request proxied by a secondary.
pub const PROXY_HEADER: &str = "gitlab-workhorse-geo-proxy";
/// Longest token accepted, in bytes (the whole `kid:JWT` value).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `exp`/`nbf`/`iat`.
pub const LEEWAY_SECS: u64 = 60;
/// Default lifetime of minted tokens.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30);

/// What a token may be used for; each scope is accepted only on its routes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    Retrieve,
    Repository,
    Catalog,
    Events,
    Status,
    Sites,
    ProxyConfig,
    Proxy,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Retrieve => "retrieve",
            Scope::Repository => "repository",
            Scope::Catalog => "catalog",
            Scope::Events => "events",
            Scope::Status => "status",
            Scope::Sites => "sites",
            Scope::ProxyConfig => "proxy-config",
            Scope::Proxy => "proxy",
            Scope::Admin => "admin",
        }
    }
}

/// The `data` claim, a JSON string `{"scope": …, …}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenData {
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl TokenData {
    pub fn scope(scope: Scope) -> Self {
        TokenData {
            scope,
            replicable: None,
            id: None,
            checksum: None,
        }
    }
    pub fn catalog(replicable: &str) -> Self {
        TokenData {
            replicable: Some(replicable.into()),
            ..Self::scope(Scope::Catalog)
        }
    }
    pub fn repository(replicable: &str, id: &str) -> Self {
        TokenData {
            replicable: Some(replicable.into()),
            id: Some(id.into()),
            ..Self::scope(Scope::Repository)
        }
    }
    pub fn retrieve(replicable: &str, id: &str, checksum: &str) -> Self {
        TokenData {
            scope: Scope::Retrieve,
            replicable: Some(replicable.into()),
            id: Some(id.into()),
            checksum: Some(checksum.into()),
        }
    }
}

/// JWT claims of a GL-Geo token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// JSON-encoded [`TokenData`].
    pub data: String,
    /// The site id the token is for.
    pub aud: String,
    /// For tracing only; tokens are reused across the requests of one fetch.
    pub jti: String,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub exp: i64,
}

/// Why a token was refused. `Display` is the one-line reason sent with the 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization must be 'GL-Geo <kid>:<token>'")]
    Malformed,
    #[error("token too large")]
    TooLarge,
    #[error("unknown key id")]
    UnknownKey,
    #[error("token algorithm does not match the key's configured algorithm")]
    AlgorithmMismatch,
    #[error("token header kid does not match the key id")]
    KidMismatch,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token validity exceeds the maximum")]
    ValidityTooLong,
    #[error("token is for another site")]
    WrongAudience,
    #[error("token scope not accepted on this route")]
    WrongScope,
    #[error("token does not grant this request")]
    WrongData,
}

/// This site's signing key.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    alg: Algorithm,
    key: EncodingKey,
    /// The expanded Ed25519 key, kept so that minting does not re-derive it: `jsonwebtoken`
    /// rebuilds its signer from the PKCS#8 bytes on every call, which doubled the cost of
    /// the per-item `retrieve` token in a backfill.
    ed25519: Option<ed25519_dalek::SigningKey>,
    /// base64url raw public key (EdDSA), as written in `GeoSite.spec.publicKeys`.
    pub public_key: Option<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("public_key", &self.public_key)
            .finish()
    }
}

const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A generated Ed25519 key pair.
pub struct GeneratedKey {
    /// PKCS#8 PEM of the private key (write with mode 0600).
    pub private_pem: String,
    /// base64url raw public key.
    pub public_key: String,
}

/// Generates a new Ed25519 key pair.
pub fn generate_key() -> GeneratedKey {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    key_from_seed(&seed)
}

fn key_from_seed(seed: &[u8; 32]) -> GeneratedKey {
    let sk = ed25519_dalek::SigningKey::from_bytes(seed);
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(seed);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    GeneratedKey {
        private_pem: format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
        public_key: URL_SAFE_NO_PAD.encode(sk.verifying_key().to_bytes()),
    }
}

/// Decodes a base64url raw Ed25519 public key (43 characters).
pub fn decode_public_key(s: &str) -> Result<[u8; 32], String> {
    if s.len() != 43 {
        return Err("an Ed25519 public key is 43 base64url characters".into());
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| "not base64url".to_string())?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| "not 32 bytes".to_string())?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr)
        .map_err(|_| "not a valid Ed25519 point".to_string())?;
    Ok(arr)
}

impl SigningKey {
    /// Loads an Ed25519 key from PKCS#8 PEM text.
    pub fn from_pem(kid: &str, pem: &str) -> Result<SigningKey, String> {
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|_| "not a PEM file (base64 body does not decode)".to_string())?;
        if der.len() != 48 || der[..16] != ED25519_PKCS8_PREFIX {
            return Err(
                "not an Ed25519 PKCS#8 private key (generate one with `geo-sidecar keygen`)".into(),
            );
        }
        let seed: [u8; 32] = der[16..].try_into().expect("length checked");
        let ed = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = ed.verifying_key().to_bytes();
        Ok(SigningKey {
            kid: kid.to_string(),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_der(&der),
            ed25519: Some(ed),
            public_key: Some(URL_SAFE_NO_PAD.encode(public)),
        })
    }

    /// Loads an Ed25519 key from a PEM file.
    pub fn from_pem_file(kid: &str, path: &Path) -> Result<SigningKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_pem(kid, &text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// An HS256 key (GitLab compatibility).
    pub fn hs256(kid: &str, secret: &[u8]) -> SigningKey {
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
            ed25519: None,
            public_key: None,
        }
    }

    /// Mints a JWT for `aud` carrying `data`, valid for `validity` (at most 60 s).
    pub fn mint(&self, aud: &str, data: &TokenData, validity: Duration) -> String {
        let now = unix_now();
        let validity = validity.min(Duration::from_secs(60)).as_secs() as i64;
        let claims = Claims {
            data: serde_json::to_string(data).expect("token data serializes"),
            aud: aud.to_string(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            nbf: Some(now - 5),
            exp: now + validity,
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        match &self.ed25519 {
            Some(ed) => sign_compact_ed25519(&header, &claims, ed),
            None => jsonwebtoken::encode(&header, &claims, &self.key)
                .expect("signing with a loaded key does not fail"),
        }
    }

    /// `GL-Geo <kid>:<JWT>`, the `Authorization` header value.
    pub fn authorization(&self, aud: &str, data: &TokenData) -> String {
        format!(
            "{SCHEME} {}:{}",
            self.kid,
            self.mint(aud, data, DEFAULT_VALIDITY)
        )
    }

    /// `<kid>:<JWT>`, the value of the proxy extra-data header.
    pub fn extra_data(&self, aud: &str) -> String {
        format!(
            "{}:{}",
            self.kid,
            self.mint(aud, &TokenData::scope(Scope::Proxy), DEFAULT_VALIDITY)
        )
    }
}

/// JWS compact serialization (RFC 7515 §7.1) with an Ed25519 signature (RFC 8037): the
/// same bytes `jsonwebtoken::encode` produces (Ed25519 is deterministic; a test compares).
fn sign_compact_ed25519<T: Serialize>(
    header: &Header,
    claims: &T,
    key: &ed25519_dalek::SigningKey,
) -> String {
    use ed25519_dalek::Signer;
    let mut out = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).expect("header serializes"));
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(
        serde_json::to_vec(claims).expect("claims serialize"),
        &mut out,
    );
    let sig = key.sign(out.as_bytes());
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut out);
    out
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

struct Trusted {
    site: String,
    alg: Algorithm,
    key: DecodingKey,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub kid: String,
    /// The site owning the signing key.
    pub site: String,
    pub data: TokenData,
    /// For logs only.
    pub jti: String,
}

/// The keys a part trusts, with the site each belongs to.
pub struct KeyRing {
    keys: HashMap<String, Trusted>,
    max_validity: Duration,
}

impl KeyRing {
    pub fn new(max_validity: Duration) -> Self {
        KeyRing {
            keys: HashMap::new(),
            max_validity: max_validity.min(Duration::from_secs(60)),
        }
    }

    /// Trusts an Ed25519 public key (base64url raw).
    pub fn add_ed25519(&mut self, kid: &str, site: &str, public_key: &str) -> Result<(), String> {
        decode_public_key(public_key)?;
        let key = DecodingKey::from_ed_components(public_key).map_err(|e| e.to_string())?;
        self.keys.insert(
            kid.into(),
            Trusted {
                site: site.into(),
                alg: Algorithm::EdDSA,
                key,
            },
        );
        Ok(())
    }

    /// Trusts an HS256 shared secret for this key id only.
    pub fn add_hs256(&mut self, kid: &str, site: &str, secret: &[u8]) {
        self.keys.insert(
            kid.into(),
            Trusted {
                site: site.into(),
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            },
        );
    }

    /// Adds a configured trusted key, reading HS256 secrets from their files.
    pub fn add_configured(&mut self, k: &TrustedKey) -> Result<(), String> {
        match k.algorithm {
            KeyAlgorithm::EdDSA => {
                let pk = k
                    .public_key
                    .as_deref()
                    .ok_or("EdDSA key without publicKey")?;
                self.add_ed25519(&k.kid, k.site(), pk)
            }
            KeyAlgorithm::HS256 => {
                let path = k
                    .secret_file
                    .as_ref()
                    .ok_or("HS256 key without secretFile")?;
                let secret = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let secret = trim_ascii_end(&secret);
                self.add_hs256(&k.kid, k.site(), secret);
                Ok(())
            }
        }
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The sites that own trusted keys.
    pub fn sites(&self) -> impl Iterator<Item = &str> {
        self.keys.values().map(|t| t.site.as_str())
    }

    /// Verifies an `Authorization` header value (`GL-Geo <kid>:<JWT>`).
    pub fn verify_authorization(
        &self,
        header: Option<&str>,
        aud: &str,
        scope: Scope,
    ) -> Result<Verified, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        if header.len() > MAX_TOKEN_BYTES + SCHEME.len() + 1 {
            return Err(AuthError::TooLarge);
        }
        let (scheme, rest) = header.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case(SCHEME) {
            return Err(AuthError::Malformed);
        }
        self.verify_token(rest.trim(), aud, scope)
    }

    /// Verifies `<kid>:<JWT>` for audience `aud` and `scope`.
    pub fn verify_token(
        &self,
        value: &str,
        aud: &str,
        scope: Scope,
    ) -> Result<Verified, AuthError> {
        if value.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let (kid, jwt) = value.split_once(':').ok_or(AuthError::Malformed)?;
        let trusted = self.keys.get(kid).ok_or(AuthError::UnknownKey)?;
        let header = jsonwebtoken::decode_header(jwt)
            .map_err(|_| AuthError::Invalid("bad token header".into()))?;
        if header.alg != trusted.alg {
            return Err(AuthError::AlgorithmMismatch);
        }
        if let Some(hkid) = &header.kid
            && hkid != kid
        {
            return Err(AuthError::KidMismatch);
        }
        let mut v = Validation::new(trusted.alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.validate_aud = false; // checked below, to give its own reason
        v.set_required_spec_claims(&["exp"]);
        let token =
            jsonwebtoken::decode::<Claims>(jwt, &trusted.key, &v).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    AuthError::Invalid("bad signature".into())
                }
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim {c}"))
                }
                jsonwebtoken::errors::ErrorKind::Json(_) => {
                    AuthError::Invalid("missing or malformed claims".into())
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let c = token.claims;
        let now = unix_now();
        if c.iat > now + LEEWAY_SECS as i64 {
            return Err(AuthError::NotYetValid);
        }
        if c.exp - c.iat > self.max_validity.as_secs() as i64 || c.exp < c.iat {
            return Err(AuthError::ValidityTooLong);
        }
        if c.aud != aud {
            return Err(AuthError::WrongAudience);
        }
        let data: TokenData = serde_json::from_str(&c.data)
            .map_err(|_| AuthError::Invalid("malformed data claim".into()))?;
        if data.scope != scope {
            return Err(AuthError::WrongScope);
        }
        Ok(Verified {
            kid: kid.to_string(),
            site: trusted.site.clone(),
            data,
            jti: c.jti,
        })
    }
}

fn trim_ascii_end(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && b[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    &b[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(kid: &str, site: &str) -> (SigningKey, KeyRing) {
        let g = generate_key();
        let sk = SigningKey::from_pem(kid, &g.private_pem).unwrap();
        assert_eq!(sk.public_key.as_deref(), Some(g.public_key.as_str()));
        let mut ring = KeyRing::new(Duration::from_secs(60));
        ring.add_ed25519(kid, site, &g.public_key).unwrap();
        (sk, ring)
    }

    #[test]
    fn round_trip_and_scope_and_audience() {
        let (sk, ring) = pair("london.1", "london");
        let h = sk.authorization("paris", &TokenData::catalog("repos"));
        let v = ring
            .verify_authorization(Some(&h), "paris", Scope::Catalog)
            .unwrap();
        assert_eq!(v.site, "london");
        assert_eq!(v.data.replicable.as_deref(), Some("repos"));
        assert_eq!(
            ring.verify_authorization(Some(&h), "paris", Scope::Events),
            Err(AuthError::WrongScope)
        );
        assert_eq!(
            ring.verify_authorization(Some(&h), "berlin", Scope::Catalog),
            Err(AuthError::WrongAudience)
        );
    }

    #[test]
    fn refuses_unknown_kid_and_tampering_and_alg_confusion() {
        let (sk, ring) = pair("london.1", "london");
        let (other, _) = pair("london.2", "london");
        let t = other.authorization("paris", &TokenData::scope(Scope::Events));
        assert_eq!(
            ring.verify_authorization(Some(&t), "paris", Scope::Events),
            Err(AuthError::UnknownKey)
        );
        // Signed by another key but presented under a trusted kid.
        let forged = format!(
            "london.1:{}",
            other.mint("paris", &TokenData::scope(Scope::Events), DEFAULT_VALIDITY)
        );
        assert_eq!(
            ring.verify_token(&forged, "paris", Scope::Events),
            Err(AuthError::KidMismatch)
        );
        // Signed by another key under the trusted kid's name.
        let g = generate_key();
        let impostor = SigningKey::from_pem("london.1", &g.private_pem).unwrap();
        let t = impostor.extra_data("paris");
        assert_eq!(
            ring.verify_token(&t, "paris", Scope::Proxy),
            Err(AuthError::Invalid("bad signature".into()))
        );
        // A valid token whose payload was changed.
        let good = sk.extra_data("paris");
        let mut parts: Vec<String> = good
            .split_once(':')
            .unwrap()
            .1
            .split('.')
            .map(String::from)
            .collect();
        parts[1] = URL_SAFE_NO_PAD.encode(
            r#"{"data":"{\"scope\":\"admin\"}","aud":"paris","jti":"x","iat":1,"exp":99999999999}"#,
        );
        let tampered = format!("london.1:{}", parts.join("."));
        assert!(ring.verify_token(&tampered, "paris", Scope::Admin).is_err());
        // HS256 signed with the public key bytes.
        let hs = SigningKey::hs256("london.1", sk.public_key.as_ref().unwrap().as_bytes());
        let t = hs.extra_data("paris");
        assert_eq!(
            ring.verify_token(&t, "paris", Scope::Proxy),
            Err(AuthError::AlgorithmMismatch)
        );
        // alg none
        let none = format!(
            "london.1:{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"data":"{\"scope\":\"proxy\"}","aud":"paris","jti":"x","iat":1,"exp":99999999999}"#)
        );
        assert!(ring.verify_token(&none, "paris", Scope::Proxy).is_err());
        let big = format!("london.1:{}", "a".repeat(9 * 1024));
        assert_eq!(
            ring.verify_token(&big, "paris", Scope::Proxy),
            Err(AuthError::TooLarge)
        );
    }

    #[test]
    fn ed25519_tokens_are_the_bytes_jsonwebtoken_makes() {
        let (sk, ring) = pair("london.1", "london");
        let claims = Claims {
            data: r#"{"scope":"retrieve","replicable":"lfs","id":"a/b","checksum":"00"}"#.into(),
            aud: "paris".into(),
            jti: "j".into(),
            iat: unix_now(),
            nbf: Some(unix_now() - 5),
            exp: unix_now() + 30,
        };
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some("london.1".into());
        let ours = sign_compact_ed25519(&h, &claims, sk.ed25519.as_ref().unwrap());
        assert_eq!(ours, jsonwebtoken::encode(&h, &claims, &sk.key).unwrap());
        let minted = sk.authorization("paris", &TokenData::retrieve("lfs", "a/b", "00"));
        let v = ring
            .verify_authorization(Some(&minted), "paris", Scope::Retrieve)
            .unwrap();
        assert_eq!(v.data.id.as_deref(), Some("a/b"));
    }

    #[test]
    fn refuses_long_validity_and_expired() {
        let (sk, ring) = pair("london.1", "london");
        let now = unix_now();
        let mk = |iat: i64, exp: i64| {
            let claims = Claims {
                data: r#"{"scope":"events"}"#.into(),
                aud: "paris".into(),
                jti: "j".into(),
                iat,
                nbf: None,
                exp,
            };
            let mut h = Header::new(Algorithm::EdDSA);
            h.kid = Some("london.1".into());
            format!(
                "london.1:{}",
                jsonwebtoken::encode(&h, &claims, &sk.key).unwrap()
            )
        };
        assert_eq!(
            ring.verify_token(&mk(now, now + 3600), "paris", Scope::Events),
            Err(AuthError::ValidityTooLong)
        );
        assert_eq!(
            ring.verify_token(&mk(now - 600, now - 570), "paris", Scope::Events),
            Err(AuthError::Expired)
        );
        assert!(
            ring.verify_token(&mk(now, now + 30), "paris", Scope::Events)
                .is_ok()
        );
    }
}
