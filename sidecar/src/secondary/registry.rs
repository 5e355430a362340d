//! The registry (tracking database) of one secondary instance: SQLite in WAL mode at
//! `stateDir/registry.db` (DESIGN §6).
//!
//! Everything here is blocking; callers run it on the blocking pool ([`Registry::run`]).
//!
//! Schema (see [`MIGRATIONS`]): one `registry` row per `(replicable, item_id)` with the columns
//! of DESIGN §6, plus `started_at` (for the stuck-row timeout) and `state_since` (when the row
//! entered its state: the age of pending rows and per-item lag). Timestamps are Unix seconds.
//! `registry_counters` holds per-replicable counts (`state_0`…`state_3`,
//! `verification_0`…`verification_4`) maintained by triggers in the same transaction as
//! every row change, so status never scans. For administrators, the views `registry_failures`
//! and `registry_readable` spell states and times out:
//!
//! ```text
//! sqlite3 registry.db 'select * from registry_failures'
//! ```

use rand::Rng;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
#[cfg(test)]
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Row states (DESIGN §6).
pub const PENDING: i64 = 0;
pub const STARTED: i64 = 1;
pub const SYNCED: i64 = 2;
pub const FAILED: i64 = 3;

/// Verification states.
pub const V_PENDING: i64 = 0;
pub const V_STARTED: i64 = 1;
pub const V_SUCCEEDED: i64 = 2;
pub const V_FAILED: i64 = 3;
pub const V_DISABLED: i64 = 4;

/// Longest `last_sync_failure` kept.
pub const MAX_FAILURE_CHARS: usize = 255;

/// Versioned migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: registry, counters, cursor.
    r#"
CREATE TABLE registry (
    replicable               TEXT    NOT NULL,
    item_id                  TEXT    NOT NULL,
    state                    INTEGER NOT NULL DEFAULT 0 CHECK (state BETWEEN 0 AND 3),
    claim_id                 TEXT,
    started_at               INTEGER,
    state_since              INTEGER NOT NULL,
    retry_count              INTEGER NOT NULL DEFAULT 0,
    retry_at                 INTEGER,
    last_sync_failure        TEXT,
    last_synced_at           INTEGER,
    primary_checksum         TEXT,
    verification_state       INTEGER NOT NULL DEFAULT 0 CHECK (verification_state BETWEEN 0 AND 4),
    verification_checksum    TEXT,
    verified_at              INTEGER,
    verification_retry_count INTEGER NOT NULL DEFAULT 0,
    verification_retry_at    INTEGER,
    checksum_mismatch        INTEGER NOT NULL DEFAULT 0,
    created_at               INTEGER NOT NULL,
    PRIMARY KEY (replicable, item_id)
);
-- (replicable, state) first: the per-state lookups; state_since last: oldest pending without a scan.
CREATE INDEX registry_replicable_state ON registry (replicable, state, state_since);
CREATE INDEX registry_retry_at ON registry (retry_at);

CREATE TABLE registry_counters (
    replicable TEXT    NOT NULL,
    counter    TEXT    NOT NULL,
    n          INTEGER NOT NULL,
    PRIMARY KEY (replicable, counter)
) WITHOUT ROWID;

CREATE TRIGGER registry_count_insert AFTER INSERT ON registry BEGIN
    INSERT INTO registry_counters VALUES (new.replicable, 'state_' || new.state, 1)
        ON CONFLICT (replicable, counter) DO UPDATE SET n = n + 1;
    INSERT INTO registry_counters VALUES (new.replicable, 'verification_' || new.verification_state, 1)
        ON CONFLICT (replicable, counter) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER registry_count_delete AFTER DELETE ON registry BEGIN
    UPDATE registry_counters SET n = n - 1
        WHERE replicable = old.replicable AND counter = 'state_' || old.state;
    UPDATE registry_counters SET n = n - 1
        WHERE replicable = old.replicable AND counter = 'verification_' || old.verification_state;
END;
CREATE TRIGGER registry_count_state AFTER UPDATE OF state ON registry
WHEN old.state IS NOT new.state BEGIN
    UPDATE registry_counters SET n = n - 1
        WHERE replicable = old.replicable AND counter = 'state_' || old.state;
    INSERT INTO registry_counters VALUES (new.replicable, 'state_' || new.state, 1)
        ON CONFLICT (replicable, counter) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER registry_count_verification AFTER UPDATE OF verification_state ON registry
WHEN old.verification_state IS NOT new.verification_state BEGIN
    UPDATE registry_counters SET n = n - 1
        WHERE replicable = old.replicable AND counter = 'verification_' || old.verification_state;
    INSERT INTO registry_counters VALUES (new.replicable, 'verification_' || new.verification_state, 1)
        ON CONFLICT (replicable, counter) DO UPDATE SET n = n + 1;
END;

CREATE TABLE replication_cursor (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    log_id         TEXT,
    last_event_id  INTEGER NOT NULL DEFAULT 0,
    updated_at     INTEGER
);
INSERT INTO replication_cursor (id, last_event_id) VALUES (1, 0);

CREATE VIEW registry_readable AS
SELECT replicable, item_id,
       CASE state WHEN 0 THEN 'pending' WHEN 1 THEN 'started' WHEN 2 THEN 'synced' ELSE 'failed' END AS state,
       retry_count,
       datetime(retry_at, 'unixepoch') AS retry_at,
       last_sync_failure,
       datetime(last_synced_at, 'unixepoch') AS last_synced_at,
       primary_checksum,
       CASE verification_state WHEN 0 THEN 'pending' WHEN 1 THEN 'started' WHEN 2 THEN 'succeeded'
            WHEN 3 THEN 'failed' ELSE 'disabled' END AS verification_state,
       verification_checksum,
       datetime(verified_at, 'unixepoch') AS verified_at,
       checksum_mismatch,
       datetime(state_since, 'unixepoch') AS state_since
FROM registry;
CREATE VIEW registry_failures AS
SELECT replicable, item_id, retry_count, retry_at, last_sync_failure, checksum_mismatch
FROM registry_readable WHERE state = 'failed' ORDER BY replicable, item_id;
"#,
    // 2: the delete guard's persistent state.
    r#"
CREATE TABLE delete_pauses (
    replicable TEXT    PRIMARY KEY,
    window_id  TEXT    NOT NULL,
    since      INTEGER NOT NULL
);
CREATE TABLE deferred_deletes (
    replicable TEXT    NOT NULL,
    item_id    TEXT    NOT NULL,
    window_id  TEXT    NOT NULL,
    queued_at  INTEGER NOT NULL,
    PRIMARY KEY (replicable, item_id)
);
"#,
    // 3: re-verification walks synced rows by verified_at without a sort.
    r#"
CREATE INDEX registry_verification ON registry (replicable, state, verified_at);
"#,
];

/// Unix seconds now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `delay(n) = n^4 + 15 + rand(0..30)·(n+1)` seconds, capped at 1 h (4 h on FILE_NOT_FOUND).
pub fn backoff_secs(n: i64, file_not_found: bool) -> i64 {
    let n = n.clamp(0, 1000);
    let r: i64 = rand::thread_rng().gen_range(0..30);
    let d = n
        .saturating_pow(4)
        .saturating_add(15)
        .saturating_add(r * (n + 1));
    let cap = if file_not_found { 4 * 3600 } else { 3600 };
    d.min(cap)
}

/// Cuts a failure message to [`MAX_FAILURE_CHARS`] characters on one line.
pub fn clip_failure(msg: &str) -> String {
    let one: String = msg
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .collect();
    if one.chars().count() <= MAX_FAILURE_CHARS {
        one
    } else {
        let mut s: String = one.chars().take(MAX_FAILURE_CHARS - 1).collect();
        s.push('…');
        s
    }
}

/// A claimed row: a worker may sync it and finish with [`Outcome`] carrying `claim_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub replicable: String,
    pub item_id: String,
    pub claim_id: String,
    /// The primary's checksum when the row was claimed.
    pub checksum: Option<String>,
    pub retry_count: i64,
}

/// How a claimed sync ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The replica equals the primary's checksum.
    Synced { claim: Claim, checksum: String },
    /// The primary moved on (newer checksum, 409): sync again soon, not a failure.
    Moved { claim: Claim, checksum: String },
    /// Failed; retried with backoff.
    Failed {
        claim: Claim,
        reason: String,
        mismatch: bool,
        file_not_found: bool,
    },
}

impl Outcome {
    pub fn claim(&self) -> &Claim {
        match self {
            Outcome::Synced { claim, .. }
            | Outcome::Moved { claim, .. }
            | Outcome::Failed { claim, .. } => claim,
        }
    }
}

/// Counts of one replicable, from the counters table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: i64,
    pub started: i64,
    pub synced: i64,
    pub failed: i64,
    pub verified: i64,
    pub verification_failed: i64,
}

impl Counts {
    pub fn total(&self) -> i64 {
        self.pending + self.started + self.synced + self.failed
    }
}

/// The event cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub log_id: Option<String>,
    pub last_event_id: i64,
}

/// A synced row due for re-verification.
#[derive(Debug, Clone)]
pub struct VerifyJob {
    pub replicable: String,
    pub item_id: String,
    pub checksum: String,
}

/// What an event or catalog entry does to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Inserted,
    Reset,
    Unchanged,
}

/// The registry. One writer connection and one reader connection (WAL lets readers run
/// beside the writer), each behind a mutex.
pub struct Registry {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    path: PathBuf,
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )?;
    Ok(c)
}

impl Registry {
    /// Opens (creating and migrating) the registry at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Arc<Registry>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut w = open_conn(path)?;
        migrate(&mut w)?;
        let r = open_conn(path)?;
        Ok(Arc::new(Registry {
            writer: Mutex::new(w),
            reader: Mutex::new(r),
            path: path.to_path_buf(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool with this registry.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Registry) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await?
    }

    /// A write transaction on the writer connection.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> anyhow::Result<T> {
        let mut c = self.writer.lock().expect("registry writer");
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let v = f(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// A read on the reader connection.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        let c = self.reader.lock().expect("registry reader");
        Ok(f(&c)?)
    }

    // ---- state changes -------------------------------------------------------------------

    /// Rows left `started` by a previous process cannot have a live worker (one registry per
    /// instance): back to pending.
    pub fn reset_started_after_restart(&self) -> anyhow::Result<usize> {
        let t = now();
        self.write(|tx| {
            tx.execute(
                "UPDATE registry SET state = 0, claim_id = NULL, started_at = NULL, state_since = ?1
                 WHERE state = 1",
                params![t],
            )
        })
    }

    /// Rows `started` longer than `timeout_secs` → failed "sync timed out after …".
    pub fn fail_stuck(&self, timeout_secs: i64) -> anyhow::Result<usize> {
        let t = now();
        let reason = format!("sync timed out after {timeout_secs}s");
        self.write(|tx| {
            let mut sel = tx.prepare_cached(
                "SELECT replicable, item_id, retry_count FROM registry
                 WHERE state = 1 AND started_at <= ?1",
            )?;
            let rows: Vec<(String, String, i64)> = sel
                .query_map(params![t - timeout_secs], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut upd = tx.prepare_cached(
                "UPDATE registry SET state = 3, claim_id = NULL, started_at = NULL, state_since = ?3,
                     retry_count = ?4, retry_at = ?5, last_sync_failure = ?6
                 WHERE replicable = ?1 AND item_id = ?2 AND state = 1",
            )?;
            for (r, id, n) in &rows {
                let n = n + 1;
                upd.execute(params![r, id, t, n, t + backoff_secs(n, false), reason])?;
            }
            Ok(rows.len())
        })
    }

    /// Claims up to `limit` due rows of `replicable` (pending with `retry_at` passed or unset,
    /// or failed with `retry_at` passed): state → started with a fresh `claim_id`. One writer
    /// connection serializes claims, so no row is ever claimed twice.
    pub fn claim_due(&self, replicable: &str, limit: usize) -> anyhow::Result<Vec<Claim>> {
        if limit == 0 {
            return Ok(vec![]);
        }
        let t = now();
        self.write(|tx| {
            // Pending rows through (replicable, state, …); failed rows whose retry time has come
            // through the retry_at index. Neither sorts nor scans the registry.
            let mut pending = tx.prepare_cached(
                "SELECT item_id, primary_checksum, retry_count FROM registry
                 WHERE replicable = ?1 AND state = 0 AND COALESCE(retry_at, 0) <= ?2 LIMIT ?3",
            )?;
            let mut rows: Vec<(String, Option<String>, i64)> = pending
                .query_map(params![replicable, t, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            if rows.len() < limit {
                let mut failed = tx.prepare_cached(
                    "SELECT item_id, primary_checksum, retry_count FROM registry INDEXED BY registry_retry_at
                     WHERE retry_at <= ?2 AND replicable = ?1 AND state = 3 LIMIT ?3",
                )?;
                let more: Vec<(String, Option<String>, i64)> = failed
                    .query_map(params![replicable, t, (limit - rows.len()) as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                rows.extend(more);
            }
            let mut upd = tx.prepare_cached(
                "UPDATE registry SET state = 1, claim_id = ?3, started_at = ?4, state_since = ?4
                 WHERE replicable = ?1 AND item_id = ?2",
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, checksum, retry_count) in rows {
                let claim_id = uuid::Uuid::new_v4().to_string();
                upd.execute(params![replicable, id, claim_id, t])?;
                out.push(Claim {
                    replicable: replicable.to_string(),
                    item_id: id,
                    claim_id,
                    checksum,
                    retry_count,
                });
            }
            Ok(out)
        })
    }

    /// Puts claimed-but-unstarted rows back to pending (a dispatcher that stops or pauses with
    /// claims queued); a claim that was reset meanwhile is left alone.
    pub fn release(&self, claims: &[Claim]) -> anyhow::Result<usize> {
        let t = now();
        self.write(|tx| {
            let mut upd = tx.prepare_cached(
                "UPDATE registry SET state = 0, claim_id = NULL, started_at = NULL, state_since = ?4
                 WHERE replicable = ?1 AND item_id = ?2 AND state = 1 AND claim_id = ?3",
            )?;
            let mut n = 0;
            for c in claims {
                n += upd.execute(params![c.replicable, c.item_id, c.claim_id, t])?;
            }
            Ok(n)
        })
    }

    /// Whether `claim` still holds (state started with this claim id).
    pub fn claim_valid(&self, claim: &Claim) -> anyhow::Result<bool> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT 1 FROM registry WHERE replicable = ?1 AND item_id = ?2
                 AND state = 1 AND claim_id = ?3",
            )?
            .query_row(
                params![claim.replicable, claim.item_id, claim.claim_id],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
        })
    }

    /// Applies finished syncs in one transaction; each update only takes effect
    /// `WHERE state = started AND claim_id = ?`. Returns, per outcome, whether it applied.
    pub fn finish(&self, outcomes: &[Outcome]) -> anyhow::Result<Vec<bool>> {
        let t = now();
        self.write(|tx| {
            let mut res = Vec::with_capacity(outcomes.len());
            for o in outcomes {
                let c = o.claim();
                let n = match o {
                    Outcome::Synced { checksum, .. } => tx
                        .prepare_cached(
                            "UPDATE registry SET state = 2, claim_id = NULL, started_at = NULL,
                                 state_since = ?4, retry_count = 0, retry_at = NULL,
                                 last_sync_failure = NULL, last_synced_at = ?4,
                                 verification_state = 2, verification_checksum = ?5, verified_at = ?4,
                                 verification_retry_count = 0, verification_retry_at = NULL,
                                 checksum_mismatch = 0
                             WHERE replicable = ?1 AND item_id = ?2 AND state = 1 AND claim_id = ?3",
                        )?
                        .execute(params![c.replicable, c.item_id, c.claim_id, t, checksum])?,
                    Outcome::Moved { checksum, .. } => tx
                        .prepare_cached(
                            "UPDATE registry SET state = 0, claim_id = NULL, started_at = NULL,
                                 state_since = ?4, retry_at = NULL, primary_checksum = ?5,
                                 checksum_mismatch = 0
                             WHERE replicable = ?1 AND item_id = ?2 AND state = 1 AND claim_id = ?3",
                        )?
                        .execute(params![c.replicable, c.item_id, c.claim_id, t, checksum])?,
                    Outcome::Failed {
                        reason,
                        mismatch,
                        file_not_found,
                        ..
                    } => {
                        let n = c.retry_count + 1;
                        let vstate = if *mismatch { V_FAILED } else { V_PENDING };
                        tx.prepare_cached(
                            "UPDATE registry SET state = 3, claim_id = NULL, started_at = NULL,
                                 state_since = ?4, retry_count = ?5, retry_at = ?6,
                                 last_sync_failure = ?7, checksum_mismatch = ?8,
                                 verification_state = ?9
                             WHERE replicable = ?1 AND item_id = ?2 AND state = 1 AND claim_id = ?3",
                        )?
                        .execute(params![
                            c.replicable,
                            c.item_id,
                            c.claim_id,
                            t,
                            n,
                            t + backoff_secs(n, *file_not_found),
                            clip_failure(reason),
                            *mismatch as i64,
                            vstate
                        ])?
                    }
                };
                res.push(n == 1);
            }
            Ok(res)
        })
    }

    /// Makes an item due now (`request_sync`): pending rows and failed rows get `retry_at`
    /// cleared; synced rows go back to pending. Returns whether a row exists.
    pub fn make_due(&self, replicable: &str, item_id: &str) -> anyhow::Result<bool> {
        let t = now();
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE registry SET state = CASE WHEN state = 1 THEN 1 ELSE 0 END,
                     retry_at = NULL, state_since = CASE WHEN state = 2 THEN ?3 ELSE state_since END
                 WHERE replicable = ?1 AND item_id = ?2",
                params![replicable, item_id, t],
            )?;
            Ok(n > 0)
        })
    }

    // ---- events and catalog ----------------------------------------------------------------

    /// A created/updated event or catalog entry with `checksum`: creates the row (pending) if
    /// missing; resets it to pending (dropping any claim) unless it already has this checksum
    /// and is synced or in flight; does nothing for an unchanged checksum.
    pub fn upsert_tx(
        tx: &Transaction<'_>,
        replicable: &str,
        item_id: &str,
        checksum: Option<&str>,
        t: i64,
    ) -> rusqlite::Result<Upsert> {
        let cur: Option<(i64, Option<String>)> = tx
            .prepare_cached(
                "SELECT state, primary_checksum FROM registry WHERE replicable = ?1 AND item_id = ?2",
            )?
            .query_row(params![replicable, item_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        tx.prepare_cached("DELETE FROM deferred_deletes WHERE replicable = ?1 AND item_id = ?2")?
            .execute(params![replicable, item_id])?;
        match cur {
            None => {
                tx.prepare_cached(
                    "INSERT INTO registry (replicable, item_id, state, state_since, primary_checksum, created_at)
                     VALUES (?1, ?2, 0, ?3, ?4, ?3)",
                )?
                .execute(params![replicable, item_id, t, checksum])?;
                Ok(Upsert::Inserted)
            }
            Some((state, cur_sum)) => {
                let same = checksum.is_some() && cur_sum.as_deref() == checksum;
                if same && state != FAILED {
                    // Synced or in flight for this very version; pending stays pending.
                    return Ok(Upsert::Unchanged);
                }
                if same && state == FAILED {
                    // A failure against the same version keeps its backoff.
                    return Ok(Upsert::Unchanged);
                }
                tx.prepare_cached(
                    "UPDATE registry SET state = 0, claim_id = NULL, started_at = NULL,
                         state_since = CASE WHEN state = 0 THEN state_since ELSE ?3 END,
                         retry_count = 0, retry_at = NULL, primary_checksum = COALESCE(?4, primary_checksum),
                         checksum_mismatch = 0, verification_state = 0
                     WHERE replicable = ?1 AND item_id = ?2",
                )?
                .execute(params![replicable, item_id, t, checksum])?;
                Ok(Upsert::Reset)
            }
        }
    }

    /// Deletes a row.
    pub fn remove_tx(
        tx: &Transaction<'_>,
        replicable: &str,
        item_id: &str,
    ) -> rusqlite::Result<bool> {
        tx.prepare_cached("DELETE FROM deferred_deletes WHERE replicable = ?1 AND item_id = ?2")?
            .execute(params![replicable, item_id])?;
        Ok(tx
            .prepare_cached("DELETE FROM registry WHERE replicable = ?1 AND item_id = ?2")?
            .execute(params![replicable, item_id])?
            > 0)
    }

    pub fn cursor(&self) -> anyhow::Result<Cursor> {
        self.read(|c| {
            c.query_row(
                "SELECT log_id, last_event_id FROM replication_cursor WHERE id = 1",
                [],
                |r| {
                    Ok(Cursor {
                        log_id: r.get(0)?,
                        last_event_id: r.get(1)?,
                    })
                },
            )
        })
    }

    pub fn set_cursor_tx(tx: &Transaction<'_>, cursor: &Cursor) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "UPDATE replication_cursor SET log_id = ?1, last_event_id = ?2, updated_at = ?3 WHERE id = 1",
        )?
        .execute(params![cursor.log_id, cursor.last_event_id, now()])?;
        Ok(())
    }

    /// Ids of `replicable`'s rows created before `before` (orphan candidates of a backfill).
    pub fn item_ids_before(&self, replicable: &str, before: i64) -> anyhow::Result<Vec<String>> {
        self.read(|c| {
            let mut s = c.prepare_cached(
                "SELECT item_id FROM registry WHERE replicable = ?1 AND created_at < ?2",
            )?;
            s.query_map(params![replicable, before], |r| r.get(0))?
                .collect()
        })
    }

    /// Replicables that have rows.
    pub fn replicables_with_rows(&self) -> anyhow::Result<Vec<String>> {
        self.read(|c| {
            let mut s = c.prepare_cached(
                "SELECT replicable FROM registry_counters GROUP BY replicable HAVING SUM(n) > 0",
            )?;
            s.query_map([], |r| r.get(0))?.collect()
        })
    }

    // ---- delete guard state ----------------------------------------------------------------

    pub fn paused_window(&self, replicable: &str) -> anyhow::Result<Option<(String, i64)>> {
        self.read(|c| {
            c.query_row(
                "SELECT window_id, since FROM delete_pauses WHERE replicable = ?1",
                params![replicable],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn deferred_count(&self, replicable: &str) -> anyhow::Result<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM deferred_deletes WHERE replicable = ?1",
                params![replicable],
                |r| r.get(0),
            )
        })
    }

    pub fn deferred(&self, replicable: &str) -> anyhow::Result<Vec<String>> {
        self.read(|c| {
            let mut s = c.prepare_cached(
                "SELECT item_id FROM deferred_deletes WHERE replicable = ?1 ORDER BY item_id",
            )?;
            s.query_map(params![replicable], |r| r.get(0))?.collect()
        })
    }

    pub fn pause_tx(
        tx: &Transaction<'_>,
        replicable: &str,
        window_id: &str,
    ) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO delete_pauses (replicable, window_id, since) VALUES (?1, ?2, ?3)
             ON CONFLICT (replicable) DO NOTHING",
            params![replicable, window_id, now()],
        )?;
        Ok(())
    }

    pub fn defer_tx(
        tx: &Transaction<'_>,
        replicable: &str,
        item_id: &str,
        window_id: &str,
    ) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO deferred_deletes (replicable, item_id, window_id, queued_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (replicable, item_id) DO NOTHING",
        )?
        .execute(params![replicable, item_id, window_id, now()])?;
        Ok(())
    }

    pub fn unpause_tx(tx: &Transaction<'_>, replicable: &str) -> rusqlite::Result<()> {
        tx.execute(
            "DELETE FROM delete_pauses WHERE replicable = ?1",
            params![replicable],
        )?;
        Ok(())
    }

    // ---- verification ------------------------------------------------------------------

    /// Synced rows verified before `older_than` (or never).
    pub fn due_verification(
        &self,
        replicable: &str,
        older_than: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<VerifyJob>> {
        self.read(|c| {
            let mut s = c.prepare_cached(
                "SELECT item_id, primary_checksum FROM registry INDEXED BY registry_verification
                 WHERE replicable = ?1 AND state = 2 AND verified_at < ?2
                   AND primary_checksum IS NOT NULL
                 LIMIT ?3",
            )?;
            s.query_map(params![replicable, older_than, limit as i64], |r| {
                Ok(VerifyJob {
                    replicable: replicable.to_string(),
                    item_id: r.get(0)?,
                    checksum: r.get(1)?,
                })
            })?
            .collect()
        })
    }

    /// Records a re-verification of a synced row (only if it is still synced with the same
    /// primary checksum). A mismatch marks the row failed (resynced at once).
    pub fn verification_result(
        &self,
        results: &[(VerifyJob, Result<String, String>)],
    ) -> anyhow::Result<usize> {
        let t = now();
        self.write(|tx| {
            let mut failed = 0;
            for (job, res) in results {
                match res {
                    Ok(sum) if *sum == job.checksum => {
                        tx.prepare_cached(
                            "UPDATE registry SET verification_state = 2, verification_checksum = ?4,
                                 verified_at = ?3, verification_retry_count = 0, verification_retry_at = NULL
                             WHERE replicable = ?1 AND item_id = ?2 AND state = 2 AND primary_checksum = ?4",
                        )?
                        .execute(params![job.replicable, job.item_id, t, sum])?;
                    }
                    other => {
                        let (vsum, why) = match other {
                            Ok(s) => (Some(s.clone()), format!(
                                "verification failed: replica checksum {} differs from the primary's {}",
                                short(s), short(&job.checksum)
                            )),
                            Err(e) => (None, format!("verification failed: {e}")),
                        };
                        failed += tx
                            .prepare_cached(
                                "UPDATE registry SET state = 3, verification_state = 3,
                                     verification_checksum = ?4, verified_at = ?3,
                                     verification_retry_count = verification_retry_count + 1,
                                     checksum_mismatch = 1, last_sync_failure = ?6,
                                     retry_at = ?3, state_since = ?3
                                 WHERE replicable = ?1 AND item_id = ?2 AND state = 2 AND primary_checksum = ?5",
                            )?
                            .execute(params![
                                job.replicable,
                                job.item_id,
                                t,
                                vsum,
                                job.checksum,
                                clip_failure(&why)
                            ])?;
                    }
                }
            }
            Ok(failed)
        })
    }

    // ---- queries (status, acceleration) ---------------------------------------------------

    /// Counts of `replicable` from the counters table (no scan).
    pub fn counts(&self, replicable: &str) -> anyhow::Result<Counts> {
        self.read(|c| {
            let mut s =
                c.prepare_cached("SELECT counter, n FROM registry_counters WHERE replicable = ?1")?;
            let mut out = Counts::default();
            let rows = s.query_map(params![replicable], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (k, n) = row?;
                match k.as_str() {
                    "state_0" => out.pending = n,
                    "state_1" => out.started = n,
                    "state_2" => out.synced = n,
                    "state_3" => out.failed = n,
                    "verification_2" => out.verified = n,
                    "verification_3" => out.verification_failed = n,
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    /// When the oldest pending row of `replicable` became pending (index seek).
    pub fn oldest_pending_since(&self, replicable: &str) -> anyhow::Result<Option<i64>> {
        self.read(|c| {
            c.query_row(
                "SELECT MIN(state_since) FROM registry WHERE replicable = ?1 AND state = 0",
                params![replicable],
                |r| r.get(0),
            )
        })
    }

    /// The `n` rows of `replicable` waiting longest (pending, started or failed), oldest first:
    /// `(item_id, since)`. Three index range reads of at most `n` rows each.
    pub fn most_lagging(&self, replicable: &str, n: usize) -> anyhow::Result<Vec<(String, i64)>> {
        self.read(|c| {
            let mut s = c.prepare_cached(
                "SELECT item_id, state_since FROM registry WHERE replicable = ?1 AND state = ?2
                 ORDER BY state_since LIMIT ?3",
            )?;
            let mut all = vec![];
            for st in [PENDING, STARTED, FAILED] {
                let rows = s.query_map(params![replicable, st, n as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?;
                for row in rows {
                    all.push(row?);
                }
            }
            all.sort_by_key(|(_, since)| *since);
            all.truncate(n);
            Ok(all)
        })
    }

    /// State and checksum of one row.
    pub fn row_state(
        &self,
        replicable: &str,
        item_id: &str,
    ) -> anyhow::Result<Option<(i64, Option<String>)>> {
        self.read(|c| {
            c.query_row(
                "SELECT state, primary_checksum FROM registry WHERE replicable = ?1 AND item_id = ?2",
                params![replicable, item_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

fn migrate(c: &mut Connection) -> anyhow::Result<()> {
    let have: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if have as usize > MIGRATIONS.len() {
        anyhow::bail!(
            "registry schema version {have} is newer than this sidecar knows ({}): refusing to downgrade",
            MIGRATIONS.len()
        );
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = c.transaction()?;
        tx.execute_batch(m)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("registry.db")).unwrap();
        (dir, reg)
    }

    fn add(reg: &Registry, r: &str, id: &str, sum: &str) -> Upsert {
        reg.write(|tx| Registry::upsert_tx(tx, r, id, Some(sum), now()))
            .unwrap()
    }

    /// Counters equal a full count (what the triggers must maintain).
    fn assert_counters_exact(reg: &Registry, r: &str) {
        let c = reg.counts(r).unwrap();
        let scan = reg
            .read(|c| {
                let q = |sql: &str| -> rusqlite::Result<i64> {
                    c.query_row(sql, params![r], |row| row.get(0))
                };
                Ok((
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND state = 0")?,
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND state = 1")?,
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND state = 2")?,
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND state = 3")?,
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND verification_state = 2")?,
                    q("SELECT COUNT(*) FROM registry WHERE replicable = ?1 AND verification_state = 3")?,
                ))
            })
            .unwrap();
        assert_eq!(
            (
                c.pending,
                c.started,
                c.synced,
                c.failed,
                c.verified,
                c.verification_failed
            ),
            scan
        );
    }

    #[test]
    fn release_returns_queued_claims_but_not_reset_ones() {
        let (_dir, reg) = open();
        add(&reg, "blobs", "a", "s1");
        add(&reg, "blobs", "b", "s1");
        let claims = reg.claim_due("blobs", 10).unwrap();
        assert_eq!(claims.len(), 2);
        // `b` gets a newer event and is claimed again by someone else.
        add(&reg, "blobs", "b", "s2");
        let again = reg.claim_due("blobs", 10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(
            reg.release(&claims).unwrap(),
            1,
            "only `a`'s claim still held"
        );
        assert_eq!(reg.row_state("blobs", "a").unwrap().unwrap().0, 0);
        assert!(
            reg.claim_valid(&again[0]).unwrap(),
            "the newer claim survives"
        );
        assert_counters_exact(&reg, "blobs");
    }

    #[test]
    fn schema_is_migrated_once_with_indexes_and_views() {
        let (dir, reg) = open();
        drop(reg);
        // Reopening applies nothing twice.
        let reg = Registry::open(&dir.path().join("registry.db")).unwrap();
        let (ver, mode, idx): (i64, String, Vec<String>) = reg
            .read(|c| {
                let v = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                let m = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let mut s = c.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'registry' ORDER BY name")?;
                let i = s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok((v, m, i))
            })
            .unwrap();
        assert_eq!(ver, MIGRATIONS.len() as i64);
        assert_eq!(mode, "wal");
        assert!(
            idx.contains(&"registry_replicable_state".to_string()),
            "{idx:?}"
        );
        assert!(idx.contains(&"registry_retry_at".to_string()), "{idx:?}");
        // The admin view answers "what failed and why".
        add(&reg, "repos", "a.git", "s1");
        let c = &reg.claim_due("repos", 1).unwrap()[0];
        reg.finish(&[Outcome::Failed {
            claim: c.clone(),
            reason: "primary answered 500".into(),
            mismatch: false,
            file_not_found: false,
        }])
        .unwrap();
        let why: String = reg
            .read(|c| {
                c.query_row(
                    "SELECT last_sync_failure FROM registry_failures WHERE item_id = 'a.git'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(why, "primary answered 500");
        // A newer schema than we know is refused.
        reg.write(|tx| tx.execute_batch("PRAGMA user_version = 99"))
            .unwrap();
        drop(reg);
        assert!(Registry::open(&dir.path().join("registry.db")).is_err());
    }

    #[test]
    fn claims_are_exclusive_and_stale_finishes_are_discarded() {
        let (_d, reg) = open();
        for i in 0..200 {
            add(&reg, "blobs", &format!("b/{i}"), "s1");
        }
        // Two claimers at once never get the same row.
        let (a, b) = std::thread::scope(|s| {
            let h1 = s.spawn(|| {
                let mut v = vec![];
                for _ in 0..50 {
                    v.extend(reg.claim_due("blobs", 3).unwrap());
                }
                v
            });
            let h2 = s.spawn(|| {
                let mut v = vec![];
                for _ in 0..50 {
                    v.extend(reg.claim_due("blobs", 3).unwrap());
                }
                v
            });
            (h1.join().unwrap(), h2.join().unwrap())
        });
        let ids: HashSet<_> = a.iter().chain(&b).map(|c| c.item_id.clone()).collect();
        assert_eq!(ids.len(), a.len() + b.len());
        assert_eq!(ids.len(), 200);
        assert!(reg.claim_due("blobs", 10).unwrap().is_empty());
        assert_counters_exact(&reg, "blobs");

        // A newer event resets a started row: the old worker cannot finish it.
        let old = a[0].clone();
        assert_eq!(add(&reg, "blobs", &old.item_id, "s2"), Upsert::Reset);
        assert!(!reg.claim_valid(&old).unwrap());
        let applied = reg
            .finish(&[Outcome::Synced {
                claim: old.clone(),
                checksum: "s1".into(),
            }])
            .unwrap();
        assert_eq!(applied, vec![false]);
        assert_eq!(
            reg.row_state("blobs", &old.item_id).unwrap(),
            Some((PENDING, Some("s2".into())))
        );
        // The same checksum again does not disturb an in-flight sync.
        let c2 = a[1].clone();
        assert_eq!(add(&reg, "blobs", &c2.item_id, "s1"), Upsert::Unchanged);
        assert!(reg.claim_valid(&c2).unwrap());
        assert_eq!(
            reg.finish(&[Outcome::Synced {
                claim: c2.clone(),
                checksum: "s1".into()
            }])
            .unwrap(),
            vec![true]
        );
        let s = reg.row_state("blobs", &c2.item_id).unwrap().unwrap();
        assert_eq!(s.0, SYNCED);
        // A finished claim cannot be used twice.
        assert_eq!(
            reg.finish(&[Outcome::Synced {
                claim: c2,
                checksum: "s1".into()
            }])
            .unwrap(),
            vec![false]
        );
        assert_counters_exact(&reg, "blobs");
    }

    #[test]
    fn stuck_rows_time_out_and_restart_resets_started() {
        let (_d, reg) = open();
        add(&reg, "repos", "x.git", "s1");
        add(&reg, "repos", "y.git", "s1");
        let claims = reg.claim_due("repos", 2).unwrap();
        assert_eq!(claims.len(), 2);
        assert_eq!(reg.fail_stuck(3600).unwrap(), 0);
        assert_eq!(reg.fail_stuck(0).unwrap(), 2);
        let (state, why, retry_at): (i64, String, i64) = reg
            .read(|c| c.query_row("SELECT state, last_sync_failure, retry_at FROM registry WHERE item_id = 'x.git'", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .unwrap();
        assert_eq!(state, FAILED);
        assert_eq!(why, "sync timed out after 0s");
        assert!(retry_at >= now() + 15);
        // The timed-out worker's result is discarded.
        assert_eq!(
            reg.finish(&[Outcome::Synced {
                claim: claims[0].clone(),
                checksum: "s1".into()
            }])
            .unwrap(),
            vec![false]
        );
        // Not due before retry_at; make_due (request_sync) makes it due now.
        assert!(reg.claim_due("repos", 5).unwrap().is_empty());
        assert!(reg.make_due("repos", "x.git").unwrap());
        let c = reg.claim_due("repos", 5).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].retry_count, 1);
        // After a crash, started rows are pending again.
        assert_eq!(reg.reset_started_after_restart().unwrap(), 1);
        assert_eq!(reg.row_state("repos", "x.git").unwrap().unwrap().0, PENDING);
        assert_counters_exact(&reg, "repos");
    }

    #[test]
    fn backoff_follows_the_formula_and_caps() {
        for n in 0..12i64 {
            for _ in 0..50 {
                let d = backoff_secs(n, false);
                let lo = (n.pow(4) + 15).min(3600);
                let hi = (n.pow(4) + 15 + 29 * (n + 1)).min(3600);
                assert!((lo..=hi).contains(&d), "n={n} d={d}");
            }
        }
        assert_eq!(backoff_secs(20, false), 3600);
        assert_eq!(backoff_secs(20, true), 4 * 3600);
        assert!(backoff_secs(9, true) > 3600);
    }

    #[test]
    fn failures_are_clipped_and_file_not_found_backs_off_longer() {
        let (_d, reg) = open();
        add(&reg, "blobs", "a", "s");
        let mut c = reg.claim_due("blobs", 1).unwrap().remove(0);
        c.retry_count = 9;
        let long = "x".repeat(1000) + "\nsecond line";
        reg.finish(&[Outcome::Failed {
            claim: c,
            reason: long,
            mismatch: false,
            file_not_found: true,
        }])
        .unwrap();
        let (why, retry_at, n): (String, i64, i64) = reg
            .read(|c| {
                c.query_row(
                    "SELECT last_sync_failure, retry_at, retry_count FROM registry",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
            })
            .unwrap();
        assert_eq!(why.chars().count(), MAX_FAILURE_CHARS);
        assert!(!why.contains('\n'));
        assert_eq!(n, 10);
        assert!(
            retry_at - now() > 3600,
            "FILE_NOT_FOUND backs off beyond 1 h"
        );
    }

    #[test]
    fn verification_mismatch_fails_the_row_for_resync() {
        let (_d, reg) = open();
        add(&reg, "blobs", "a", "good");
        add(&reg, "blobs", "b", "good");
        let cs = reg.claim_due("blobs", 2).unwrap();
        let outs: Vec<_> = cs
            .iter()
            .map(|c| Outcome::Synced {
                claim: c.clone(),
                checksum: "good".into(),
            })
            .collect();
        assert_eq!(reg.finish(&outs).unwrap(), vec![true, true]);
        assert_eq!(reg.counts("blobs").unwrap().verified, 2);
        let jobs = reg.due_verification("blobs", now() + 1, 10).unwrap();
        assert_eq!(jobs.len(), 2);
        let results: Vec<_> = jobs
            .into_iter()
            .map(|j| {
                let r = if j.item_id == "a" {
                    Ok("good".to_string())
                } else {
                    Ok("tampered".to_string())
                };
                (j, r)
            })
            .collect();
        assert_eq!(reg.verification_result(&results).unwrap(), 1);
        let c = reg.counts("blobs").unwrap();
        assert_eq!(
            (c.synced, c.failed, c.verified, c.verification_failed),
            (1, 1, 1, 1)
        );
        let mismatch: i64 = reg
            .read(|c| {
                c.query_row(
                    "SELECT checksum_mismatch FROM registry WHERE item_id = 'b'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(mismatch, 1);
        // Due for resync at once.
        let again = reg.claim_due("blobs", 5).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].item_id, "b");
        assert_counters_exact(&reg, "blobs");
    }

    #[test]
    fn moved_goes_back_to_pending_and_status_queries_use_counters() {
        let (_d, reg) = open();
        for i in 0..30 {
            add(&reg, "repos", &format!("r{i}.git"), "s1");
        }
        let cs = reg.claim_due("repos", 10).unwrap();
        let outs: Vec<_> = cs
            .iter()
            .enumerate()
            .map(|(i, c)| match i % 3 {
                0 => Outcome::Synced {
                    claim: c.clone(),
                    checksum: "s1".into(),
                },
                1 => Outcome::Moved {
                    claim: c.clone(),
                    checksum: "s2".into(),
                },
                _ => Outcome::Failed {
                    claim: c.clone(),
                    reason: "x".into(),
                    mismatch: true,
                    file_not_found: false,
                },
            })
            .collect();
        reg.finish(&outs).unwrap();
        let c = reg.counts("repos").unwrap();
        assert_eq!(
            (c.pending, c.started, c.synced, c.failed),
            (20 + 3, 0, 4, 3)
        );
        assert_eq!(c.total(), 30);
        assert!(reg.oldest_pending_since("repos").unwrap().is_some());
        let lag = reg.most_lagging("repos", 5).unwrap();
        assert_eq!(lag.len(), 5);
        // Deletes keep counters exact too.
        reg.write(|tx| Registry::remove_tx(tx, "repos", "r0.git"))
            .unwrap();
        assert_counters_exact(&reg, "repos");
        // The cursor is durable.
        reg.write(|tx| {
            Registry::set_cursor_tx(
                tx,
                &Cursor {
                    log_id: Some("L".into()),
                    last_event_id: 42,
                },
            )
        })
        .unwrap();
        assert_eq!(
            reg.cursor().unwrap(),
            Cursor {
                log_id: Some("L".into()),
                last_event_id: 42
            }
        );
    }

    /// Status queries read counters and index ranges only: their time does not grow with the
    /// registry. CI uses 100k rows; the benchmark sets `GEO_BENCH_REGISTRY_ROWS=1000000`.
    #[test]
    fn status_queries_stay_fast_on_a_large_registry() {
        let rows: usize = std::env::var("GEO_BENCH_REGISTRY_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let (_d, reg) = open();
        let t = now();
        let fill = std::time::Instant::now();
        reg.write(|tx| {
            for i in 0..rows {
                let r = if i % 2 == 0 { "repos" } else { "blobs" };
                Registry::upsert_tx(
                    tx,
                    r,
                    &format!("g{}/item{i}", i % 1000),
                    Some("sum"),
                    t - (i % 5000) as i64,
                )?;
            }
            Ok(())
        })
        .unwrap();
        // A realistic mix of states.
        for r in ["repos", "blobs"] {
            let cs = reg.claim_due(r, rows / 4).unwrap();
            let outs: Vec<_> = cs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i % 50 == 0 {
                        Outcome::Failed {
                            claim: c.clone(),
                            reason: "x".into(),
                            mismatch: false,
                            file_not_found: false,
                        }
                    } else {
                        Outcome::Synced {
                            claim: c.clone(),
                            checksum: "sum".into(),
                        }
                    }
                })
                .collect();
            reg.finish(&outs).unwrap();
        }
        let filled = fill.elapsed();
        let mut worst = std::time::Duration::ZERO;
        for _ in 0..20 {
            let q = std::time::Instant::now();
            let _ = reg.cursor().unwrap();
            for r in ["repos", "blobs"] {
                let c = reg.counts(r).unwrap();
                assert_eq!(c.total() as usize, rows / 2);
                assert!(reg.oldest_pending_since(r).unwrap().is_some());
                assert_eq!(reg.most_lagging(r, 10).unwrap().len(), 10);
                let _ = reg.paused_window(r).unwrap();
            }
            worst = worst.max(q.elapsed());
        }
        println!(
            "RESULT registry_status rows={rows} fill_seconds={:.1} worst_status_query_ms={:.2}",
            filled.as_secs_f64(),
            worst.as_secs_f64() * 1000.0
        );
        assert!(
            worst < std::time::Duration::from_millis(50),
            "status took {worst:?}"
        );
    }
}
