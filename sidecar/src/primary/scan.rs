//! Reading the storage: finding items, cheap change fingerprints, the storage identity marker.
//! All functions are blocking (run them on the blocking pool).

use crate::items::Patterns;
use geoforge_crds::replicable::DataType;
use sha2::{Digest, Sha256};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// File in each source root that identifies the storage (DESIGN §4 delete guard).
pub const MARKER: &str = ".geoforge-storage-id";

/// An item found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub fingerprint: String,
    /// Blob size (repositories: 0 here; measured when checksummed).
    pub size: u64,
}

/// Whether `dir` looks like a bare Git repository.
pub fn is_bare_repo(dir: &Path) -> bool {
    dir.join("HEAD").is_file() && dir.join("objects").is_dir() && dir.join("refs").is_dir()
}

/// Whether an id is servable: valid, and without percent-escapes (an id is decoded from its
/// URL segment exactly once, so a literal `%2e` in a name would be ambiguous with double
/// encoding; such names are refused everywhere).
pub fn servable_id(id: &str) -> bool {
    crate::items::validate_item_id(id).is_ok() && !has_percent_escape(id)
}

pub fn has_percent_escape(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

fn meta_sig(h: &mut Sha256, name: &[u8], m: &Metadata) {
    h.update(name);
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    h.update(m.size().to_le_bytes());
    h.update(m.ino().to_le_bytes());
    h.update([0]);
}

/// Fingerprint of a blob: size, mtime, inode.
pub fn blob_fingerprint(m: &Metadata) -> String {
    let mut h = Sha256::new();
    meta_sig(&mut h, b"blob", m);
    hex::encode(&h.finalize()[..16])
}

/// Fingerprint of a repository's refs: `packed-refs`, every loose ref file and ref directory
/// (a ref update renames a file into its directory, changing the directory's mtime), and
/// reftable tables. Refs change ⇒ the fingerprint changes; the checksum is computed only then.
pub fn repo_fingerprint(dir: &Path) -> String {
    let mut h = Sha256::new();
    for f in ["packed-refs", "HEAD", "reftable/tables.list"] {
        if let Ok(m) = std::fs::symlink_metadata(dir.join(f)) {
            meta_sig(&mut h, f.as_bytes(), &m);
        }
    }
    let mut stack = vec![dir.join("refs")];
    while let Some(d) = stack.pop() {
        if let Ok(m) = std::fs::symlink_metadata(&d) {
            meta_sig(&mut h, d.as_os_str().as_encoded_bytes(), &m);
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                meta_sig(&mut h, e.path().as_os_str().as_encoded_bytes(), &m);
            }
        }
    }
    hex::encode(&h.finalize()[..16])
}

/// Bytes of a repository's object store (packs and loose objects).
pub fn repo_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.join("objects")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Stats one item on disk: `None` when it is absent (or not the right kind of thing).
pub fn stat_item(kind: DataType, path: &Path) -> Option<Found> {
    let m = std::fs::symlink_metadata(path).ok()?;
    match kind {
        DataType::Blob if m.is_file() => Some(Found {
            id: String::new(),
            fingerprint: blob_fingerprint(&m),
            size: m.len(),
        }),
        DataType::Repository if m.is_dir() && is_bare_repo(path) => Some(Found {
            id: String::new(),
            fingerprint: repo_fingerprint(path),
            size: 0,
        }),
        _ => None,
    }
}

/// SHA-256 (hex) and size of a blob, blocking. The same definition as
/// [`crate::checksum::blob_checksum`] (a test keeps them equal); the bulk scan uses it to
/// checksum a batch of small files in one blocking task.
pub fn blob_checksum_blocking(path: &Path, buf: &mut [u8]) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

/// Result of walking a replicable's root.
#[derive(Debug, Default)]
pub struct Walk {
    pub found: Vec<Found>,
    /// Names skipped because they cannot be item ids (not UTF-8, percent-escapes, …).
    pub skipped: u64,
}

/// Finds every item of a replicable: bare repositories (not descended into) or regular files
/// matching the patterns. Symlinks are never followed.
pub fn walk(root: &Path, kind: DataType, patterns: &Patterns) -> std::io::Result<Walk> {
    let mut out = Walk::default();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if prefix.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "cannot read directory: {e}");
                continue;
            }
        };
        for e in rd.filter_map(Result::ok) {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_symlink() {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                out.skipped += 1;
                continue;
            };
            if prefix.is_empty() && name == MARKER {
                continue;
            }
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = e.path();
            if ft.is_dir() {
                if kind == DataType::Repository && is_bare_repo(&path) {
                    if patterns.matches(&rel) {
                        if servable_id(&rel) {
                            out.found.push(Found {
                                fingerprint: repo_fingerprint(&path),
                                id: rel,
                                size: 0,
                            });
                        } else {
                            out.skipped += 1;
                        }
                    }
                } else {
                    stack.push((path, rel));
                }
            } else if ft.is_file() && kind == DataType::Blob && patterns.matches(&rel) {
                if !servable_id(&rel) {
                    out.skipped += 1;
                    continue;
                }
                if let Ok(m) = e.metadata() {
                    out.found.push(Found {
                        fingerprint: blob_fingerprint(&m),
                        size: m.len(),
                        id: rel,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// What the marker check found.
#[derive(Debug, PartialEq, Eq)]
pub enum MarkerState {
    /// The marker exists; its storage id.
    Present(String),
    Missing,
}

pub fn read_marker(root: &Path) -> std::io::Result<MarkerState> {
    match std::fs::read_to_string(root.join(MARKER)) {
        Ok(s) if !s.trim().is_empty() => Ok(MarkerState::Present(s.trim().to_string())),
        Ok(_) => Ok(MarkerState::Missing),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MarkerState::Missing),
        Err(e) => Err(e),
    }
}

/// Writes a new marker (creating the root), durably. Only called when the catalog of every
/// replicable under this root is empty: nothing could be deleted by mistake.
pub fn create_marker(root: &Path) -> std::io::Result<String> {
    use std::io::Write;
    std::fs::create_dir_all(root)?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(root.join(MARKER))?;
    f.write_all(format!("{id}\n").as_bytes())?;
    f.sync_all()?;
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocking_blob_checksum_equals_the_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = vec![0u8; 4096];
        for (i, len) in [0usize, 1, 4095, 4096, 300_000].into_iter().enumerate() {
            let p = dir.path().join(format!("b{i}"));
            let data: Vec<u8> = (0..len).map(|x| (x * 7 + i) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            assert_eq!(
                blob_checksum_blocking(&p, &mut buf).unwrap(),
                crate::checksum::blob_checksum(&p).await.unwrap()
            );
        }
    }

    #[test]
    fn walks_blobs_without_symlinks_or_marker() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/c.bin"), b"x").unwrap();
        std::fs::write(root.join("top"), b"y").unwrap();
        std::fs::write(root.join("odd%2e"), b"y").unwrap();
        std::fs::write(root.join(MARKER), b"id").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let p = Patterns::new(&["**".into()], &[]).unwrap();
        let w = walk(root, DataType::Blob, &p).unwrap();
        let mut ids: Vec<_> = w.found.iter().map(|f| f.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, vec!["a/b/c.bin", "top"]);
        assert_eq!(w.skipped, 1);
        assert!(walk(&root.join("nope"), DataType::Blob, &p).is_err());
    }
}
