//! The embedded forge's credentials file: `user:$sha256$<salt>$<hex>` lines.
//!
//! Salted, iterated SHA-256 keeps the dependency set small; the file is a Secret readable only
//! by the sidecar. Comparison is constant-time.

use sha2::{Digest, Sha256};

const ITERATIONS: u32 = 100_000;

/// Hashes a password with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let salt = hex::encode(salt);
    format!("$sha256${salt}${}", derive(&salt, password))
}

fn derive(salt: &str, password: &str) -> String {
    let mut h = Sha256::digest(format!("{salt}:{password}").as_bytes());
    for _ in 1..ITERATIONS {
        h = Sha256::digest(h);
    }
    hex::encode(h)
}

/// Checks a password against a stored hash.
pub fn verify_password(stored: &str, password: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some(""), Some("sha256"), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let got = derive(salt, password);
    got.len() == hash.len()
        && got
            .bytes()
            .zip(hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let h = super::hash_password("s3cret");
        assert!(super::verify_password(&h, "s3cret"));
        assert!(!super::verify_password(&h, "s3cret!"));
        assert!(!super::verify_password("garbage", "s3cret"));
    }
}
