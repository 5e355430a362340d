//! Item ids and the one URL ↔ item mapping (DESIGN §3, §4).
//!
//! An item id is a path relative to its replicable's root (`group/project.git`, `ab/cd/abcd…`).
//! In Geo API URLs it is one segment with `/` encoded as `%2F`, decoded exactly once.
//! [`RepoMapper::map`] is the single function that turns a client URL path into a repository
//! item; acceleration, the authorization cache, read-your-writes and replication all use it.

use geoforge_crds::config::{ReplicableConfig, SidecarConfig};
use geoforge_crds::replicable::{DataType, UrlMapping};
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::path::{Component, Path, PathBuf};

/// Why an item id or path was refused (→ 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ItemIdError {
    #[error("item id is empty")]
    Empty,
    #[error("item id is not valid percent-encoded UTF-8")]
    BadEncoding,
    #[error(
        "item id must be a relative path without '.', '..', empty segments, backslashes or NUL"
    )]
    Unsafe,
    #[error("item id leaves its storage root")]
    EscapesRoot,
}

/// Checks an item id (already decoded).
pub fn validate_item_id(id: &str) -> Result<(), ItemIdError> {
    if id.is_empty() {
        return Err(ItemIdError::Empty);
    }
    if id.len() > 4096 || id.starts_with('/') || id.contains('\0') || id.contains('\\') {
        return Err(ItemIdError::Unsafe);
    }
    for seg in id.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(ItemIdError::Unsafe);
        }
    }
    Ok(())
}

/// Decodes a URL path segment exactly once and validates it as an item id.
/// `%2e%2e` decodes to `..` and is refused; `%252e` decodes to `%2e` and stays literal
/// (a file literally named `%2e` is a different item).
pub fn decode_item_segment(segment: &str) -> Result<String, ItemIdError> {
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| ItemIdError::BadEncoding)?;
    validate_item_id(&decoded)?;
    Ok(decoded.into_owned())
}

/// Encodes an item id as one URL path segment.
pub fn encode_item_segment(id: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(id, SET).to_string()
}

/// The path of `id` under `root`, refusing ids that leave it, also through symlinks:
/// every existing ancestor is canonicalized and must stay under the canonical root.
pub fn resolve_under(root: &Path, id: &str) -> Result<PathBuf, ItemIdError> {
    validate_item_id(id)?;
    let rel = Path::new(id);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(ItemIdError::Unsafe);
    }
    let path = root.join(rel);
    // Every component is a plain name, so the path can only leave the root through a symlink
    // below it: walk the existing prefixes with lstat (cheap) and resolve only a symlink.
    // Symlinks that stay inside the root are allowed; a missing prefix ends the walk (the
    // item may not exist yet, and nothing below a missing directory can be a link).
    let mut prefix = root.to_path_buf();
    for c in rel.components() {
        prefix.push(c);
        match std::fs::symlink_metadata(&prefix) {
            Ok(m) if m.file_type().is_symlink() => {
                let canon_root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
                match prefix.canonicalize() {
                    Ok(target) if target.starts_with(&canon_root) => {}
                    Ok(_) => return Err(ItemIdError::EscapesRoot),
                    // A dangling link: whatever it names would be created outside our control.
                    Err(_) => return Err(ItemIdError::EscapesRoot),
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(path)
}

/// Glob set of a replicable's include/exclude (and a site's selective sync).
#[derive(Clone, Debug)]
pub struct Patterns {
    include: GlobSet,
    exclude: GlobSet,
    include_all: bool,
}

impl Patterns {
    /// `include` empty means everything.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Patterns, globset::Error> {
        let build = |pats: &[String]| -> Result<GlobSet, globset::Error> {
            let mut b = GlobSetBuilder::new();
            for p in pats {
                b.add(Glob::new(p)?);
            }
            b.build()
        };
        Ok(Patterns {
            include: build(include)?,
            exclude: build(exclude)?,
            include_all: include.is_empty(),
        })
    }

    pub fn matches(&self, id: &str) -> bool {
        (self.include_all || self.include.is_match(id)) && !self.exclude.is_match(id)
    }
}

/// A client URL mapped to a repository item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoTarget {
    pub replicable: String,
    pub item_id: String,
    /// What follows the repository in the URL path, e.g. `/info/refs` or `/git-upload-pack`.
    pub rest: String,
}

struct RepoEntry {
    name: String,
    mapping: UrlMapping,
    patterns: Patterns,
}

/// Maps client URL paths to repository items, for every repository replicable in the config.
pub struct RepoMapper {
    entries: Vec<RepoEntry>,
}

/// Suffixes that end the repository part of a Git smart-HTTP / LFS URL.
const GIT_SUFFIXES: [&str; 5] = [
    "/info/refs",
    "/git-upload-pack",
    "/git-receive-pack",
    "/info/lfs",
    "/HEAD",
];

impl RepoMapper {
    pub fn new(config: &SidecarConfig) -> Result<RepoMapper, String> {
        let mut entries = vec![];
        for r in config
            .replicables
            .iter()
            .filter(|r| r.data_type == DataType::Repository)
        {
            entries.push(RepoEntry {
                name: r.name.clone(),
                mapping: r.url_mapping.clone().unwrap_or(UrlMapping {
                    append_git_suffix: true,
                    ..Default::default()
                }),
                patterns: Patterns::new(&r.include, &r.exclude)
                    .map_err(|e| format!("replicable {}: {e}", r.name))?,
            });
        }
        Ok(RepoMapper { entries })
    }

    /// The repository item a client URL path (no query) refers to, if any replicable maps it.
    pub fn map(&self, url_path: &str) -> Option<RepoTarget> {
        for e in &self.entries {
            if e.mapping.unmapped {
                continue;
            }
            let Some(after) = url_path.strip_prefix(e.mapping.prefix.trim_end_matches('/')) else {
                continue;
            };
            if !after.starts_with('/') {
                continue;
            }
            let path = if e.mapping.case_insensitive {
                after.to_ascii_lowercase()
            } else {
                after.to_string()
            };
            let (repo, rest) = split_repo(&path)?;
            let mut id = repo.trim_start_matches('/').to_string();
            if e.mapping.append_git_suffix && !id.ends_with(".git") {
                id.push_str(".git");
            }
            if validate_item_id(&id).is_err() || !e.patterns.matches(&id) {
                continue;
            }
            return Some(RepoTarget {
                replicable: e.name.clone(),
                item_id: id,
                rest: rest.to_string(),
            });
        }
        None
    }
}

/// Splits `/group/project.git/info/refs` into (`/group/project.git`, `/info/refs`).
fn split_repo(path: &str) -> Option<(&str, &str)> {
    if let Some(i) = path.find(".git/") {
        return Some((&path[..i + 4], &path[i + 4..]));
    }
    if path.ends_with(".git") {
        return Some((path, ""));
    }
    GIT_SUFFIXES
        .iter()
        .filter_map(|s| path.find(s))
        .min()
        .map(|i| (&path[..i], &path[i..]))
        .filter(|(r, _)| r.len() > 1)
}

/// The directory holding a replicable's items.
pub fn replicable_root(config: &SidecarConfig, r: &ReplicableConfig) -> PathBuf {
    if r.source_path.is_empty() {
        config.storage_root.clone()
    } else {
        config.storage_root.join(&r.source_path)
    }
}

/// Expands a blob replicable's `idTemplate` for an LFS oid (`{oid}`, `{oid:START:LEN}`).
pub fn expand_id_template(template: &str, oid: &str) -> Option<String> {
    if oid.len() != 64 || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}')? + open;
        let ph = &rest[open + 1..close];
        if ph == "oid" {
            out.push_str(oid);
        } else {
            let mut parts = ph.split(':');
            if parts.next()? != "oid" {
                return None;
            }
            let start: usize = parts.next()?.parse().ok()?;
            let len: usize = parts.next()?.parse().ok()?;
            out.push_str(oid.get(start..start + len)?);
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    validate_item_id(&out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids() {
        assert!(validate_item_id("group/project.git").is_ok());
        for bad in ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a\\b", "a\0b"] {
            assert!(validate_item_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            decode_item_segment("group%2Fproject.git").unwrap(),
            "group/project.git"
        );
        assert!(decode_item_segment("%2e%2e").is_err());
        assert!(decode_item_segment("a%2F..%2Fb").is_err());
        assert_eq!(decode_item_segment("%252e%252e").unwrap(), "%2e%2e");
        assert!(decode_item_segment("%2Fetc%2Fpasswd").is_err());
        assert!(decode_item_segment("a%00b").is_err());
        assert_eq!(encode_item_segment("a/b c.git"), "a%2Fb%20c.git");
    }

    #[test]
    fn symlinks_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        assert_eq!(
            resolve_under(&root, "evil/passwd"),
            Err(ItemIdError::EscapesRoot)
        );
        assert!(resolve_under(&root, "fine/new.git").is_ok());
        // A dangling link would let a later create_dir_all build outside the root.
        let outside = dir.path().join("outside-not-yet");
        std::os::unix::fs::symlink(&outside, root.join("dangling")).unwrap();
        assert_eq!(
            resolve_under(&root, "dangling/x"),
            Err(ItemIdError::EscapesRoot)
        );
        // Links that stay inside, and a root that is itself a link, are fine.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        assert!(resolve_under(&root, "alias/blob").is_ok());
        let link_root = dir.path().join("link-root");
        std::os::unix::fs::symlink(&root, &link_root).unwrap();
        assert_eq!(
            resolve_under(&link_root, "real/b").unwrap(),
            link_root.join("real/b")
        );
        assert_eq!(
            resolve_under(&link_root, "evil/passwd"),
            Err(ItemIdError::EscapesRoot)
        );
    }

    #[test]
    fn url_mapping() {
        let yaml = r#"
siteId: tokyo
role: secondary
externalUrl: https://t
stateDir: /tmp/s
storageRoot: /tmp/r
primary: { staticUrl: "https://p" }
keys: { kid: tokyo.1, privateKeyFile: /k }
replicables:
  - { name: repos, type: repository, sourcePath: repositories, include: ["**/*.git"], exclude: ["secret/**"] }
"#;
        let cfg = SidecarConfig::from_yaml(yaml, "t").unwrap();
        let m = RepoMapper::new(&cfg).unwrap();
        let t = m.map("/group/project.git/info/refs").unwrap();
        assert_eq!(
            (t.replicable.as_str(), t.item_id.as_str(), t.rest.as_str()),
            ("repos", "group/project.git", "/info/refs")
        );
        let t = m.map("/group/project/git-upload-pack").unwrap();
        assert_eq!(t.item_id, "group/project.git");
        assert!(m.map("/secret/x.git/info/refs").is_none());
        assert!(m.map("/../x.git/info/refs").is_none());
        assert!(m.map("/users/sign_in").is_none());
    }

    #[test]
    fn id_templates() {
        let oid = "ab".repeat(32);
        assert_eq!(
            expand_id_template("{oid:0:2}/{oid:2:2}/{oid}", &oid).unwrap(),
            format!("ab/ab/{oid}")
        );
        assert!(expand_id_template("{oid}", "../x").is_none());
        assert!(expand_id_template("{sha}", &oid).is_none());
    }
}
