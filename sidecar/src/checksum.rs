//! Checksums exactly as DESIGN §6 defines them; primary catalog and secondary verification
//! both use these functions, so the two sides can only agree or truly differ.

use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::io::AsyncReadExt;

/// SHA-256 (hex) of a blob's content, streamed.
pub async fn blob_checksum(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// SHA-256 (hex) of a repository's refs: the lines `<refname> <objectname>` of every ref under
/// `refs/` (no HEAD, no peeled lines), each ending in `\n`, sorted bytewise.
pub async fn repository_checksum(repo: &Path) -> std::io::Result<String> {
    let out = crate::git::command(repo)
        .args(["for-each-ref", "--format=%(refname) %(objectname)", "refs/"])
        .output()
        .await?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "git for-each-ref failed in {}: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(refs_checksum(&out.stdout))
}

/// The checksum of a `for-each-ref` listing (any order).
pub fn refs_checksum(listing: &[u8]) -> String {
    let mut lines: Vec<&[u8]> = listing
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort_unstable();
    let mut hasher = Sha256::new();
    for l in lines {
        hasher.update(l);
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter() {
        let a = refs_checksum(b"refs/heads/main 1111\nrefs/tags/v1 2222\n");
        let b = refs_checksum(b"refs/tags/v1 2222\nrefs/heads/main 1111");
        assert_eq!(a, b);
        assert_eq!(refs_checksum(b""), hex::encode(Sha256::digest(b"")));
    }
}
