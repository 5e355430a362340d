//! Lands small blobs in batches: one durability barrier per batch instead of two fsyncs per
//! blob (the backfill of many small files was bound by fsyncs and thread hand-offs).
//!
//! A sync worker receives a small blob into memory, checks its SHA-256 and hands it here.
//! The lander takes everything queued at that moment as one batch and, on one blocking
//! thread (DESIGN §6: written to a temporary file, checked, fsynced, renamed):
//!
//! 1. writes every blob to its `.geo-tmp-*` file in the target directory;
//! 2. barrier: `syncfs` of each filesystem the batch touched — the temporary files' bytes
//!    are durable (a failed barrier fails the whole batch: nothing is renamed);
//! 3. per blob, under its item lock: re-checks the claim and renames into place (a stale
//!    claim removes its temporary file and is discarded);
//! 4. barrier again — the renames are durable — and only then answers the workers, whose
//!    outcomes go to the committer: the registry never counts a blob whose bytes or name a
//!    power loss could still take away.
//!
//! No timer: a batch is whatever queued while the previous one was landing, so a lone blob
//! lands at once and a backfill lands hundreds per barrier. `syncfs` flushes everything
//! dirty on that filesystem (the site's own volume in Kubernetes); writers that bypass the
//! lander (repositories, large blobs) fsync their own files as before.
//!
//! An item whose lock is held elsewhere (a verification or delete of the same item) is not
//! waited for on the lander's thread: its temporary file is already durable, and its rename
//! is finished by an async task that waits for the lock like any other holder.

use super::registry::{Claim, Outcome, Registry};
use super::sync::{ItemLocks, failed, tmp_path};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Blobs up to this size are received into memory and landed in batches; larger ones stream
/// to their temporary file as they arrive. Memory held: `concurrency` × this, at most.
pub const INLINE_BLOB_MAX: u64 = 256 * 1024;

/// Most blobs landed per barrier.
const MAX_BATCH: usize = 1024;

/// Bytes of checked blobs that may wait for (or be in) a landing, in KiB. A sync worker
/// reserves its blob's share and then frees its transfer slot (`concurrency`), so transfers
/// go on while a batch waits for its barriers: with the slot held to the end, throughput was
/// capped at `concurrency` blobs per barrier pair (≈ 3.4k blobs/s for 64 slots here).
const BUDGET_KIB: usize = 32 * 1024;

/// One checked blob waiting to be landed.
pub struct Landing {
    pub claim: Claim,
    /// The final path (inside the replicable's root).
    pub path: PathBuf,
    pub data: Bytes,
    /// SHA-256 of `data`, already compared with the claim's.
    pub checksum: String,
}

type Reply = oneshot::Sender<Option<Outcome>>;

/// Handle to the lander task.
#[derive(Clone)]
pub struct Lander {
    tx: mpsc::UnboundedSender<(Landing, Reply)>,
    budget: Arc<tokio::sync::Semaphore>,
}

/// A blob's share of the landing budget, held until it has landed.
pub struct Admission(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Lander {
    pub fn start(registry: Arc<Registry>, locks: ItemLocks) -> Lander {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, registry, locks));
        Lander {
            tx,
            budget: Arc::new(tokio::sync::Semaphore::new(BUDGET_KIB)),
        }
    }

    /// Waits until `len` more bytes may queue for landing (memory stays bounded however
    /// far the transfers run ahead of the barriers).
    pub async fn admit(&self, len: usize) -> Admission {
        let kib = len.div_ceil(1024).clamp(1, BUDGET_KIB) as u32;
        Admission(
            self.budget
                .clone()
                .acquire_many_owned(kib)
                .await
                .expect("the landing budget is never closed"),
        )
    }

    /// Lands one blob; `None` when its claim was lost meanwhile (nothing renamed).
    pub async fn land(&self, l: Landing) -> Option<Outcome> {
        let claim = l.claim.clone();
        let (reply, rx) = oneshot::channel();
        if self.tx.send((l, reply)).is_err() {
            return Some(failed(claim, "shutting down".into()));
        }
        rx.await
            .unwrap_or_else(|_| Some(failed(claim, "the blob lander stopped".into())))
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<(Landing, Reply)>,
    registry: Arc<Registry>,
    locks: ItemLocks,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        let (reg, lk) = (registry.clone(), locks.clone());
        let deferred = match tokio::task::spawn_blocking(move || land_batch(batch, &reg, &lk)).await
        {
            Ok(d) => d,
            Err(e) => {
                // The replies were dropped with the batch: the workers report failures.
                tracing::error!("blob lander: {e}");
                continue;
            }
        };
        for d in deferred {
            let (reg, lk) = (registry.clone(), locks.clone());
            tokio::spawn(finish_deferred(d, reg, lk));
        }
    }
}

/// A landing whose temporary file is durable but whose item lock was busy.
struct Deferred {
    tmp: PathBuf,
    landing: Landing,
    reply: Reply,
}

fn land_batch(
    batch: Vec<(Landing, Reply)>,
    registry: &Registry,
    locks: &ItemLocks,
) -> Vec<Deferred> {
    // 1. temporary files
    let mut written = Vec::with_capacity(batch.len());
    let mut dirs: HashMap<u64, PathBuf> = HashMap::new();
    // Parents already made in this batch (blobs often share a directory).
    let mut made: HashSet<PathBuf> = HashSet::new();
    for (l, reply) in batch {
        let tmp = tmp_path(&l.path);
        match write_tmp(&l, &tmp, &mut made) {
            Ok(dev) => {
                dirs.entry(dev)
                    .or_insert_with(|| l.path.parent().unwrap_or(&l.path).to_path_buf());
                written.push((tmp, l, reply));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = reply.send(Some(failed(l.claim, e)));
            }
        }
    }
    // 2. their bytes durable
    if let Err(e) = barrier(&dirs) {
        for (tmp, l, reply) in written {
            let _ = std::fs::remove_file(&tmp);
            let _ = reply.send(Some(failed(l.claim, e.clone())));
        }
        return vec![];
    }
    // 3. renames under the item locks
    let mut done = Vec::with_capacity(written.len());
    let mut deferred = vec![];
    for (tmp, l, reply) in written {
        let Some(_guard) = locks.try_lock(&l.claim.replicable, &l.claim.item_id) else {
            deferred.push(Deferred {
                tmp,
                landing: l,
                reply,
            });
            continue;
        };
        let outcome = rename_if_claimed(&tmp, l, registry);
        done.push((reply, outcome));
    }
    // 4. the renames durable, then the answers
    let failure = if done.is_empty() {
        None
    } else {
        barrier(&dirs).err()
    };
    for (reply, outcome) in done {
        let outcome = match (&failure, outcome) {
            // Renamed but not known durable: not counted as synced (the row stays claimable).
            (Some(e), Some(o)) => Some(failed(o.claim().clone(), e.clone())),
            (_, o) => o,
        };
        let _ = reply.send(outcome);
    }
    deferred
}

/// Creates the target directory (unless `made` has it) and writes the temporary file;
/// returns its filesystem id.
fn write_tmp(l: &Landing, tmp: &Path, made: &mut HashSet<PathBuf>) -> Result<u64, String> {
    use std::io::Write;
    let parent = l.path.parent().unwrap_or(&l.path);
    if !made.contains(parent) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        made.insert(parent.to_path_buf());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(&l.data)
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("stat {}: {e}", tmp.display()))?;
    Ok(meta.dev())
}

/// Under the item lock (held by the caller): re-checks the claim, renames into place.
fn rename_if_claimed(tmp: &Path, l: Landing, registry: &Registry) -> Option<Outcome> {
    match registry.claim_valid(&l.claim) {
        Ok(true) => {}
        Ok(false) => {
            let _ = std::fs::remove_file(tmp);
            return None;
        }
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Some(failed(l.claim, format!("registry: {e:#}")));
        }
    }
    if let Err(e) = std::fs::rename(tmp, &l.path) {
        let _ = std::fs::remove_file(tmp);
        return Some(failed(l.claim, format!("rename into place: {e}")));
    }
    Some(Outcome::Synced {
        claim: l.claim,
        checksum: l.checksum,
    })
}

/// `syncfs` of every filesystem in `dirs` (one directory on each).
fn barrier(dirs: &HashMap<u64, PathBuf>) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    for dir in dirs.values() {
        let f = std::fs::File::open(dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
        let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
        if rc != 0 {
            return Err(format!(
                "syncfs {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

async fn finish_deferred(d: Deferred, registry: Arc<Registry>, locks: ItemLocks) {
    let claim = d.landing.claim.clone();
    let _g = locks.lock(&claim.replicable, &claim.item_id).await;
    let parent = d
        .landing
        .path
        .parent()
        .unwrap_or(&d.landing.path)
        .to_path_buf();
    let outcome = tokio::task::spawn_blocking(move || {
        let o = rename_if_claimed(&d.tmp, d.landing, &registry);
        match (o, std::fs::File::open(&parent).and_then(|f| f.sync_all())) {
            (Some(o), Err(e)) => Some(failed(
                o.claim().clone(),
                format!("fsync {}: {e}", parent.display()),
            )),
            (o, _) => o,
        }
    })
    .await
    .unwrap_or_else(|e| Some(failed(claim, format!("blob lander: {e}"))));
    let _ = d.reply.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn registry(dir: &Path) -> Arc<Registry> {
        Registry::open(&dir.join("registry.sqlite3")).unwrap()
    }

    fn upsert(reg: &Registry, id: &str, sum: &str) {
        reg.write(|tx| {
            Registry::upsert_tx(tx, "blobs", id, Some(sum), super::super::registry::now())
        })
        .unwrap();
    }

    fn claim_one(reg: &Registry, id: &str, sum: &str) -> Claim {
        upsert(reg, id, sum);
        let mut c = reg.claim_due("blobs", 10).unwrap();
        c.retain(|c| c.item_id == id);
        c.pop().expect("claimed")
    }

    fn landing(root: &Path, claim: Claim, data: &'static [u8]) -> Landing {
        Landing {
            path: root.join(&claim.item_id),
            checksum: hex::encode(Sha256::digest(data)),
            data: Bytes::from_static(data),
            claim,
        }
    }

    #[tokio::test]
    async fn lands_a_batch_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let root = dir.path().join("blobs");
        let lander = Lander::start(reg.clone(), ItemLocks::default());
        let mut waits = vec![];
        for i in 0..50 {
            let data: &'static [u8] =
                Box::leak(format!("blob {i}").into_bytes().into_boxed_slice());
            let sum = hex::encode(Sha256::digest(data));
            let c = claim_one(&reg, &format!("d{}/b{i}", i % 3), &sum);
            let l = lander.clone();
            let land = landing(&root, c, data);
            waits.push(tokio::spawn(async move { l.land(land).await }));
        }
        for (i, w) in waits.into_iter().enumerate() {
            let out = w.await.unwrap().expect("claim held");
            assert!(matches!(out, Outcome::Synced { .. }), "{i}: {out:?}");
            let body = std::fs::read(root.join(format!("d{}/b{i}", i % 3))).unwrap();
            assert_eq!(body, format!("blob {i}").into_bytes());
        }
        assert_eq!(
            super::super::sync::clean_tmp(&root),
            0,
            "temporary files left behind"
        );
    }

    #[tokio::test]
    async fn a_lost_claim_renames_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let root = dir.path().join("blobs");
        let sum = hex::encode(Sha256::digest(b"old"));
        let c = claim_one(&reg, "x", &sum);
        // A newer event resets the row while the worker holds the old bytes.
        upsert(&reg, "x", &"f".repeat(64));
        let lander = Lander::start(reg.clone(), ItemLocks::default());
        assert!(lander.land(landing(&root, c, b"old")).await.is_none());
        assert!(!root.join("x").exists(), "stale bytes under the final name");
        assert_eq!(super::super::sync::clean_tmp(&root), 0);
    }

    #[tokio::test]
    async fn a_busy_item_lock_is_waited_for_off_the_lander_thread() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let root = dir.path().join("blobs");
        let locks = ItemLocks::default();
        let sum = hex::encode(Sha256::digest(b"data"));
        let c = claim_one(&reg, "held", &sum);
        let guard = locks.lock("blobs", "held").await;
        let lander = Lander::start(reg.clone(), locks.clone());
        let l = lander.clone();
        let land = landing(&root, c, b"data");
        let w = tokio::spawn(async move { l.land(land).await });
        // Other blobs still land while that lock is held.
        let sum2 = hex::encode(Sha256::digest(b"other"));
        let c2 = claim_one(&reg, "free", &sum2);
        assert!(matches!(
            lander.land(landing(&root, c2, b"other")).await,
            Some(Outcome::Synced { .. })
        ));
        assert!(!root.join("held").exists(), "renamed without its item lock");
        drop(guard);
        assert!(matches!(w.await.unwrap(), Some(Outcome::Synced { .. })));
        assert_eq!(std::fs::read(root.join("held")).unwrap(), b"data");
    }
}
