//! Syncing one claimed item: repositories by `git fetch`, blobs by streaming retrieve
//! (DESIGN §6). Nothing half-written is ever under the final name: new repositories and blobs
//! are written under a `.geo-tmp-*` name in the target directory and renamed into place under
//! the per-item lock, after re-checking the claim.

use super::client::{ApiError, GeoClient, error_chain};
use super::landing::{INLINE_BLOB_MAX, Lander, Landing};
use super::registry::{Claim, Outcome, Registry};
use crate::items::{replicable_root, resolve_under};
use geoforge_crds::auth::TokenData;
use geoforge_crds::config::{ReplicableConfig, SidecarConfig};
use geoforge_crds::wire::{ChecksumConflict, ErrorBody};
use http::StatusCode;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Prefix of temporary names (in the target directory); removed at start-up.
pub const TMP_PREFIX: &str = ".geo-tmp-";

type LockMap = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// Per-item locks: the final rename / ref update, local deletes and verification of one item
/// are serialized.
#[derive(Clone, Default)]
pub struct ItemLocks(Arc<Mutex<LockMap>>);

/// A held item lock; the map entry is dropped with the last holder.
pub struct ItemGuard {
    map: Arc<Mutex<LockMap>>,
    key: (String, String),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl ItemLocks {
    pub async fn lock(&self, replicable: &str, item_id: &str) -> ItemGuard {
        let (key, m) = self.entry(replicable, item_id);
        let guard = m.lock_owned().await;
        self.guard(key, guard)
    }

    /// The lock of an item if nobody holds it now (for blocking threads that must not wait).
    pub fn try_lock(&self, replicable: &str, item_id: &str) -> Option<ItemGuard> {
        let (key, m) = self.entry(replicable, item_id);
        let guard = m.try_lock_owned().ok()?;
        Some(self.guard(key, guard))
    }

    /// The item's mutex, registered in the map (a guard's drop removes it when unused).
    fn entry(
        &self,
        replicable: &str,
        item_id: &str,
    ) -> ((String, String), Arc<tokio::sync::Mutex<()>>) {
        let key = (replicable.to_string(), item_id.to_string());
        let m = self
            .0
            .lock()
            .expect("item locks")
            .entry(key.clone())
            .or_default()
            .clone();
        (key, m)
    }

    fn guard(&self, key: (String, String), guard: tokio::sync::OwnedMutexGuard<()>) -> ItemGuard {
        ItemGuard {
            map: self.0.clone(),
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for ItemGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("item locks");
        if let Some(g) = self.guard.take() {
            let arc = tokio::sync::OwnedMutexGuard::mutex(&g).clone();
            drop(g);
            // map + `arc`: nobody else holds or waits for it.
            if Arc::strong_count(&arc) <= 2 {
                map.remove(&self.key);
            }
        }
    }
}

/// What a sync needs.
#[derive(Clone)]
pub struct Syncer {
    pub config: Arc<SidecarConfig>,
    pub registry: Arc<Registry>,
    pub locks: ItemLocks,
    pub client: GeoClient,
    /// Lands small blobs in batches ([`super::landing`]).
    pub lander: Lander,
}

/// Result of a sync: `None` when the claim was lost (a newer event or the timeout reset the
/// row): the stale result is discarded without touching the final name.
pub type SyncResult = Option<Outcome>;

impl Syncer {
    /// `slot`: the worker's transfer slot (one of `concurrency`); a small blob frees it once
    /// received and checked, before it waits to land.
    pub async fn sync(
        &self,
        base: &str,
        rc: &ReplicableConfig,
        claim: Claim,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> SyncResult {
        let root = replicable_root(&self.config, rc);
        let is_blob = rc.data_type == geoforge_crds::replicable::DataType::Blob;
        // Blob parents (the root included) are created where the blob is written.
        if !is_blob && let Err(e) = tokio::fs::create_dir_all(&root).await {
            return Some(failed(
                claim,
                format!("cannot create {}: {e}", root.display()),
            ));
        }
        let path = match resolve_under(&root, &claim.item_id) {
            Ok(p) => p,
            Err(e) => return Some(failed(claim, format!("refused item id: {e}"))),
        };
        match rc.data_type {
            geoforge_crds::replicable::DataType::Repository => {
                self.sync_repository(base, rc, claim, &path).await
            }
            geoforge_crds::replicable::DataType::Blob => {
                self.sync_blob(base, rc, claim, &path, slot).await
            }
        }
    }

    async fn claim_valid(&self, claim: &Claim) -> bool {
        let c = claim.clone();
        self.registry
            .run(move |r| r.claim_valid(&c))
            .await
            .unwrap_or(false)
    }

    // ---- repositories --------------------------------------------------------------------

    async fn sync_repository(
        &self,
        base: &str,
        rc: &ReplicableConfig,
        claim: Claim,
        path: &Path,
    ) -> SyncResult {
        let url = GeoClient::repository_url(base, &rc.name, &claim.item_id);
        let auth = self
            .client
            .long_authorization(&TokenData::repository(&rc.name, &claim.item_id));
        let timeout = self.config.geo.sync_timeout;
        let local = if is_dir(path).await {
            // Existing replica: fetch under the item lock (the fetch is the ref update).
            let _g = self.locks.lock(&rc.name, &claim.item_id).await;
            if !self.claim_valid(&claim).await {
                return None;
            }
            if let Err(e) = git_fetch(path, &url, &auth, timeout).await {
                return Some(failed(claim, e));
            }
            maintain_packs(path, false).await;
            match crate::checksum::repository_checksum(path).await {
                Ok(s) => s,
                Err(e) => return Some(failed(claim, e.to_string())),
            }
        } else {
            let parent = path.parent().unwrap_or(path);
            if let Err(e) = tokio::fs::create_dir_all(parent).await {
                return Some(failed(
                    claim,
                    format!("cannot create {}: {e}", parent.display()),
                ));
            }
            let tmp = tmp_path(path);
            let r = async {
                let out = crate::git::command(parent)
                    .args(["init", "-q", "--bare"])
                    .arg(&tmp)
                    .output()
                    .await
                    .map_err(|e| format!("git init: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "git init failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                git_fetch(&tmp, &url, &auth, timeout).await?;
                maintain_packs(&tmp, true).await;
                fsync_tree_best_effort(&tmp).await;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Some(failed(claim, e));
            }
            let _g = self.locks.lock(&rc.name, &claim.item_id).await;
            if !self.claim_valid(&claim).await {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return None;
            }
            if let Err(e) = replace_dir(&tmp, path).await {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Some(failed(claim, e));
            }
            match crate::checksum::repository_checksum(path).await {
                Ok(s) => s,
                Err(e) => return Some(failed(claim, e.to_string())),
            }
        };
        if claim.checksum.as_deref() == Some(local.as_str()) {
            return Some(Outcome::Synced {
                claim,
                checksum: local,
            });
        }
        // Differs from the checksum we were asked for: what does the primary report now?
        match ls_remote_checksum(path, &url, &auth).await {
            Ok(now) if now == local => Some(Outcome::Synced {
                claim,
                checksum: local,
            }),
            Ok(now) if Some(now.as_str()) != claim.checksum.as_deref() => Some(Outcome::Moved {
                claim,
                checksum: now,
            }),
            Ok(now) => Some(mismatch(
                claim,
                format!(
                    "checksum mismatch: replica {} but the primary reports {}",
                    &local[..12],
                    &now[..12.min(now.len())]
                ),
            )),
            Err(e) => Some(failed(claim, e)),
        }
    }

    // ---- blobs -------------------------------------------------------------------------

    async fn sync_blob(
        &self,
        base: &str,
        rc: &ReplicableConfig,
        claim: Claim,
        path: &Path,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> SyncResult {
        let Some(expected) = claim.checksum.clone() else {
            return Some(failed(
                claim,
                "no checksum known for this blob yet (waiting for the catalog)".into(),
            ));
        };
        let resp = match self
            .client
            .retrieve(base, &rc.name, &claim.item_id, &expected)
            .await
        {
            Ok(r) => r,
            Err(e) => return Some(failed(claim, e.to_string())),
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::CONFLICT => {
                let body = GeoClient::body(resp, Duration::from_secs(30)).await;
                return Some(
                    match body
                        .ok()
                        .and_then(|b| serde_json::from_slice::<ChecksumConflict>(&b).ok())
                    {
                        Some(c) => Outcome::Moved {
                            claim,
                            checksum: c.current_checksum,
                        },
                        None => failed(claim, "409 without a current_checksum".into()),
                    },
                );
            }
            StatusCode::NOT_FOUND => {
                let body = GeoClient::body(resp, Duration::from_secs(30))
                    .await
                    .unwrap_or_default();
                let code = serde_json::from_slice::<ErrorBody>(&body)
                    .ok()
                    .and_then(|b| b.geo_code);
                let fnf = code.as_deref() == Some("FILE_NOT_FOUND");
                return Some(Outcome::Failed {
                    reason: if fnf {
                        "the primary answered FILE_NOT_FOUND".into()
                    } else {
                        format!(
                            "primary answered 404: {}",
                            String::from_utf8_lossy(&body[..body.len().min(200)])
                        )
                    },
                    claim,
                    mismatch: false,
                    file_not_found: fnf,
                });
            }
            s => {
                let body = GeoClient::body(resp, Duration::from_secs(30))
                    .await
                    .unwrap_or_default();
                return Some(failed(
                    claim,
                    ApiError::Status {
                        status: s,
                        body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                    }
                    .to_string(),
                ));
            }
        }
        let announced = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = announced.filter(|&n| n <= INLINE_BLOB_MAX) {
            let (data, got) = match receive_small(resp, len).await {
                Ok(x) => x,
                Err(e) => return Some(failed(claim, e)),
            };
            if got != expected {
                return Some(checksum_mismatch(claim, &got, &expected));
            }
            let admission = self.lander.admit(data.len()).await;
            drop(slot);
            let out = self
                .lander
                .land(Landing {
                    claim,
                    path: path.to_path_buf(),
                    data,
                    checksum: got,
                })
                .await;
            drop(admission);
            return out;
        }
        let parent = path.parent().unwrap_or(path).to_path_buf();
        if let Err(e) = tokio::fs::create_dir_all(&parent).await {
            return Some(failed(
                claim,
                format!("cannot create {}: {e}", parent.display()),
            ));
        }
        let tmp = tmp_path(path);
        let got = match stream_to(resp, &tmp).await {
            Ok(sum) => sum,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Some(failed(claim, e));
            }
        };
        if got != expected {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Some(checksum_mismatch(claim, &got, &expected));
        }
        let _g = self.locks.lock(&rc.name, &claim.item_id).await;
        if !self.claim_valid(&claim).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return None;
        }
        if let Err(e) = tokio::fs::rename(&tmp, path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Some(failed(claim, format!("rename into place: {e}")));
        }
        fsync_dir(&parent).await;
        Some(Outcome::Synced {
            claim,
            checksum: got,
        })
    }
}

fn checksum_mismatch(claim: Claim, got: &str, expected: &str) -> Outcome {
    mismatch(
        claim,
        format!(
            "checksum mismatch: received {} but expected {}",
            &got[..12],
            &expected[..12.min(expected.len())]
        ),
    )
}

/// A failure that counts as a checksum mismatch (DESIGN §6 `checksum_mismatch`).
fn mismatch(claim: Claim, reason: String) -> Outcome {
    Outcome::Failed {
        reason,
        claim,
        mismatch: true,
        file_not_found: false,
    }
}

/// Receives a body announced as at most [`INLINE_BLOB_MAX`] bytes into memory while hashing;
/// a body longer than announced is refused (hyper enforces `Content-Length` too).
async fn receive_small(
    resp: super::client::Response,
    announced: u64,
) -> Result<(bytes::Bytes, String), String> {
    let mut hasher = Sha256::new();
    let mut body = resp.into_body();
    let mut buf = bytes::BytesMut::with_capacity(announced as usize);
    while let Some(data) = next_chunk(&mut body).await? {
        if (buf.len() + data.len()) as u64 > INLINE_BLOB_MAX {
            return Err("body longer than its Content-Length".into());
        }
        hasher.update(&data);
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), hex::encode(hasher.finalize())))
}

/// The next data chunk of a transfer; fails when the primary stalls for 60 s.
async fn next_chunk(body: &mut hyper::body::Incoming) -> Result<Option<bytes::Bytes>, String> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .map_err(|_| "transfer stalled for 60s".to_string())?;
        let Some(frame) = frame else {
            return Ok(None);
        };
        let frame = frame.map_err(|e| format!("transfer: {}", error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

pub(super) fn failed(claim: Claim, reason: String) -> Outcome {
    Outcome::Failed {
        claim,
        reason,
        mismatch: false,
        file_not_found: false,
    }
}

async fn is_dir(p: &Path) -> bool {
    tokio::fs::metadata(p)
        .await
        .map(|m| m.is_dir())
        .unwrap_or(false)
}

/// `<dir>/.geo-tmp-<uuid>-<name>`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short: String = name.chars().take(64).collect();
    path.with_file_name(format!(
        "{TMP_PREFIX}{}-{short}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Streams a response body to `tmp` while hashing; fsyncs the file. Returns the SHA-256.
async fn stream_to(resp: super::client::Response, tmp: &Path) -> Result<String, String> {
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .await
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut body = resp.into_body();
    while let Some(data) = next_chunk(&mut body).await? {
        hasher.update(&data);
        f.write_all(&data)
            .await
            .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    }
    f.flush().await.map_err(|e| e.to_string())?;
    f.sync_all()
        .await
        .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Incremental fetches that leave more packs than this trigger a repack.
const MAX_PACKS: usize = 16;

/// Keeps a replica in one pack with a reachability bitmap, as a forge keeps its repositories,
/// so a clone served from the replica costs what it costs on the primary (a fetch into an
/// empty repository writes a pack without a bitmap). Runs after the first fetch (`always`) and
/// when incremental fetches have piled up packs. Best effort: a failure only costs speed.
async fn maintain_packs(repo: &Path, always: bool) {
    if !always {
        let packs = std::fs::read_dir(repo.join("objects/pack"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                    .count()
            })
            .unwrap_or(0);
        if packs <= MAX_PACKS {
            return;
        }
    }
    match crate::git::command(repo)
        .args(["repack", "-a", "-d", "-b", "-q"])
        .output()
        .await
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::warn!(
            repo = %repo.display(),
            "git repack failed (clones from this replica stay slower): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => tracing::warn!(repo = %repo.display(), "git repack: {e}"),
    }
}

/// fsyncs a directory (the rename of an entry in it), best effort.
pub async fn fsync_dir(dir: &Path) {
    let d = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || std::fs::File::open(&d).and_then(|f| f.sync_all()))
        .await;
}

/// fsyncs the files git wrote (packs, refs) before the rename, best effort.
async fn fsync_tree_best_effort(dir: &Path) {
    let d = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        fn walk(p: &Path, depth: usize) {
            if depth > 6 {
                return;
            }
            let Ok(rd) = std::fs::read_dir(p) else { return };
            for e in rd.flatten() {
                let path = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&path, depth + 1),
                    Ok(t) if t.is_file() => {
                        let _ = std::fs::File::open(&path).and_then(|f| f.sync_all());
                    }
                    _ => {}
                }
            }
            let _ = std::fs::File::open(p).and_then(|f| f.sync_all());
        }
        walk(&d, 0)
    })
    .await;
}

/// Renames `tmp` to `path`; an existing `path` (a replica that appeared meanwhile) is moved
/// aside first and removed after.
async fn replace_dir(tmp: &Path, path: &Path) -> Result<(), String> {
    let parent = path.parent().unwrap_or(path).to_path_buf();
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        let aside = tmp_path(path);
        tokio::fs::rename(path, &aside)
            .await
            .map_err(|e| format!("move old replica aside: {e}"))?;
        tokio::fs::rename(tmp, path)
            .await
            .map_err(|e| format!("rename into place: {e}"))?;
        let _ = tokio::fs::remove_dir_all(&aside).await;
    } else {
        tokio::fs::rename(tmp, path)
            .await
            .map_err(|e| format!("rename into place: {e}"))?;
    }
    fsync_dir(&parent).await;
    Ok(())
}

/// A git command carrying the token in its environment (`GIT_CONFIG_*`), never on its
/// command line; no redirects followed.
fn git_with_token(dir: &Path, auth: &str) -> tokio::process::Command {
    let mut c = crate::git::command(dir);
    let cfg = [
        ("safe.directory", "*".to_string()),
        ("http.extraHeader", format!("Authorization: {auth}")),
        ("http.followRedirects", "false".into()),
        ("http.lowSpeedLimit", "1000".into()),
        ("http.lowSpeedTime", "60".into()),
        ("credential.helper", String::new()),
        ("gc.auto", "0".into()),
        ("maintenance.auto", "false".into()),
    ];
    c.env("GIT_CONFIG_COUNT", cfg.len().to_string());
    for (i, (k, v)) in cfg.iter().enumerate() {
        c.env(format!("GIT_CONFIG_KEY_{i}"), k)
            .env(format!("GIT_CONFIG_VALUE_{i}"), v);
    }
    c.env("GIT_ASKPASS", "/bin/false")
        .env_remove("GIT_TRACE")
        .env_remove("GIT_TRACE_CURL")
        .env_remove("GIT_CURL_VERBOSE");
    c
}

/// `git fetch --prune --atomic <url> +refs/*:refs/*` into `repo`.
async fn git_fetch(repo: &Path, url: &str, auth: &str, timeout: Duration) -> Result<(), String> {
    let mut c = git_with_token(repo, auth);
    c.args([
        "fetch",
        "--quiet",
        "--prune",
        "--atomic",
        "--no-tags",
        "--no-write-fetch-head",
        "--no-auto-maintenance",
        url,
        "+refs/*:refs/*",
    ]);
    let out = tokio::time::timeout(timeout, c.output())
        .await
        .map_err(|_| format!("git fetch did not finish within {timeout:?}"))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git fetch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The primary's current repository checksum, from `git ls-remote` on the Geo endpoint.
async fn ls_remote_checksum(repo: &Path, url: &str, auth: &str) -> Result<String, String> {
    let mut c = git_with_token(repo, auth);
    c.args(["ls-remote", "--refs", url, "refs/*"]);
    let out = tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .map_err(|_| "git ls-remote did not finish in 120s".to_string())?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git ls-remote failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut listing = Vec::new();
    for line in out.stdout.split(|b| *b == b'\n') {
        let Some(tab) = line.iter().position(|b| *b == b'\t') else {
            continue;
        };
        let (oid, name) = (&line[..tab], &line[tab + 1..]);
        if !name.starts_with(b"refs/") || name.ends_with(b"^{}") {
            continue;
        }
        listing.extend_from_slice(name);
        listing.push(b' ');
        listing.extend_from_slice(oid);
        listing.push(b'\n');
    }
    Ok(crate::checksum::refs_checksum(&listing))
}

/// Removes an item's local copy (under the item lock, held by the caller): a repository is
/// moved aside then removed, a file unlinked; empty parent directories up to `root` go too.
pub async fn remove_local(root: &Path, item_id: &str) -> Result<(), String> {
    let path = resolve_under(root, item_id).map_err(|e| e.to_string())?;
    match tokio::fs::symlink_metadata(&path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
        Ok(m) if m.is_dir() => {
            let aside = tmp_path(&path);
            tokio::fs::rename(&path, &aside)
                .await
                .map_err(|e| format!("move aside: {e}"))?;
            tokio::fs::remove_dir_all(&aside)
                .await
                .map_err(|e| format!("remove: {e}"))?;
        }
        Ok(_) => tokio::fs::remove_file(&path)
            .await
            .map_err(|e| format!("remove: {e}"))?,
    }
    let mut p = path.parent();
    while let Some(d) = p {
        if d == root || !d.starts_with(root) {
            break;
        }
        if tokio::fs::remove_dir(d).await.is_err() {
            break;
        }
        p = d.parent();
    }
    if let Some(parent) = path.parent() {
        fsync_dir(parent).await;
    }
    Ok(())
}

/// Removes `.geo-tmp-*` leftovers of a killed process under `root` (not descending into
/// bare repositories).
pub fn clean_tmp(root: &Path) -> usize {
    fn walk(p: &Path, depth: usize, n: &mut usize) {
        if depth > 32 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let path = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if name.to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = if is_dir {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                *n += 1;
            } else if is_dir && !path.join("HEAD").is_file() {
                walk(&path, depth + 1, n);
            }
        }
    }
    let mut n = 0;
    walk(root, 0, &mut n);
    n
}
