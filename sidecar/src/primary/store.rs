//! The primary's SQLite database (`stateDir/primary.db`, WAL, `synchronous=FULL`): the catalog,
//! the event log, secondary instances' reports and cursors, and the delete guard's state.
//!
//! Every function here is blocking; callers run them through [`Store::call`], which moves the
//! work to tokio's blocking pool. Writes that produce events happen in one transaction with
//! the catalog change, so an event exists iff the catalog change it describes does.

use chrono::{DateTime, TimeZone, Utc};
use geoforge_crds::wire::{EventKind, GeoEvent, StatusReport};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Versioned migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    replicable TEXT NOT NULL,
    item_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    verified_at INTEGER,
    verification_failure TEXT,
    UNIQUE (replicable, item_id)
);
CREATE INDEX items_replicable_seq ON items (replicable, seq);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    replicable TEXT NOT NULL,
    item_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    checksum TEXT,
    at INTEGER NOT NULL
);
CREATE INDEX events_at ON events (at);
CREATE TABLE instances (
    site TEXT NOT NULL,
    instance TEXT NOT NULL,
    log_id TEXT,
    cursor INTEGER NOT NULL,
    report TEXT NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (site, instance)
);
CREATE TABLE delete_log (replicable TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX delete_log_replicable_at ON delete_log (replicable, at);
CREATE TABLE paused_deletes (
    replicable TEXT NOT NULL,
    item_id TEXT NOT NULL,
    window_id TEXT NOT NULL,
    detected_at INTEGER NOT NULL,
    PRIMARY KEY (replicable, item_id)
);
CREATE TABLE storage_ids (replicable TEXT PRIMARY KEY, storage_id TEXT NOT NULL);
"#];

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// A catalog row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRow {
    pub seq: i64,
    pub item_id: String,
    pub size: u64,
    pub checksum: String,
    pub fingerprint: String,
    pub updated_at: DateTime<Utc>,
}

/// What a writer believed the row to be when it read the disk (optimistic concurrency):
/// a write whose expectation no longer holds is skipped and reported as a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No check.
    Any,
    /// The row's fingerprint, or `None` for "no row".
    Fingerprint(Option<String>),
}

/// A new state of an item read from disk.
#[derive(Debug, Clone)]
pub struct Upsert {
    pub item_id: String,
    pub size: u64,
    pub checksum: String,
    pub fingerprint: String,
    pub expect: Expect,
}

/// Outcome of a guarded delete.
#[derive(Debug, Default)]
pub struct DeleteOutcome {
    pub events: Vec<GeoEvent>,
    /// Set when the deletes were paused (the window id to confirm).
    pub paused: Option<String>,
}

/// Delete guard parameters.
#[derive(Debug, Clone, Copy)]
pub struct DeleteGuard {
    pub window_ms: i64,
    pub min: u64,
    pub percent: u64,
}

/// Result of reading the event log.
#[derive(Debug)]
pub enum EventsRead {
    Page {
        events: Vec<GeoEvent>,
        last_event_id: i64,
    },
    Gone {
        oldest_id: i64,
        last_event_id: i64,
    },
}

/// One stored instance report.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub site: String,
    pub instance: String,
    pub report: StatusReport,
    pub reported_at: i64,
}

/// Paused deletes of one replicable.
#[derive(Debug, Clone)]
pub struct PausedRow {
    pub replicable: String,
    pub window_id: String,
    pub count: u64,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating and migrating) the database. A new database gets a new `log_id`.
    pub fn open(path: &Path) -> anyhow::Result<(Store, String)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            anyhow::bail!(
                "{}: cannot use WAL mode (got {mode}); SQLite must live on a local volume, not NFS",
                path.display()
            );
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            anyhow::bail!(
                "{}: schema version {version} is newer than this geo-sidecar understands ({}); run a newer version",
                path.display(),
                MIGRATIONS.len()
            );
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
            tx.commit()?;
        }
        let log_id: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let log_id = match log_id {
            Some(l) => l,
            None => {
                let l = uuid::Uuid::new_v4().to_string();
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('log_id', ?1)",
                    params![l],
                )?;
                l
            }
        };
        Ok((
            Store {
                conn: Arc::new(Mutex::new(conn)),
            },
            log_id,
        ))
    }

    /// Runs `f` with the connection on the calling (blocking) thread.
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("database lock poisoned"))?;
        f(&mut c)
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.call_blocking(f))
            .await
            .map_err(|e| anyhow::anyhow!("database task failed: {e}"))?
    }
}

fn meta_i64(c: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0),
    )
}

fn set_meta(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// Newest event id ever assigned (0 for an empty log), also after pruning.
pub fn last_event_id(c: &Connection) -> rusqlite::Result<i64> {
    Ok(c.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
        [],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

/// Highest pruned event id (cursors below it get 410).
pub fn pruned_through(c: &Connection) -> rusqlite::Result<i64> {
    meta_i64(c, "pruned_through")
}

fn row_to_item(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    Ok(ItemRow {
        seq: r.get(0)?,
        item_id: r.get(1)?,
        size: r.get::<_, i64>(2)?.max(0) as u64,
        checksum: r.get(3)?,
        fingerprint: r.get(4)?,
        updated_at: ms_to_time(r.get(5)?),
    })
}

const ITEM_COLS: &str = "seq, item_id, size, checksum, fingerprint, updated_at";

pub fn get_item(c: &Connection, replicable: &str, id: &str) -> rusqlite::Result<Option<ItemRow>> {
    // Cached: this runs once per retrieve.
    c.prepare_cached(&format!(
        "SELECT {ITEM_COLS} FROM items WHERE replicable = ?1 AND item_id = ?2"
    ))?
    .query_row(params![replicable, id], row_to_item)
    .optional()
}

/// `item_id → fingerprint` of a replicable (the rescan's snapshot).
pub fn fingerprints(
    c: &Connection,
    replicable: &str,
) -> rusqlite::Result<std::collections::HashMap<String, String>> {
    let mut st = c.prepare("SELECT item_id, fingerprint FROM items WHERE replicable = ?1")?;
    let rows = st.query_map(params![replicable], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// A catalog page after `after` (a `seq`), in `seq` order: items inserted while a client pages
/// get larger `seq`s, so nothing is skipped or repeated.
pub fn catalog_page(
    c: &Connection,
    replicable: &str,
    after: i64,
    limit: usize,
) -> rusqlite::Result<(Vec<ItemRow>, u64)> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {ITEM_COLS} FROM items WHERE replicable = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
    ))?;
    let items = st
        .query_map(params![replicable, after, limit as i64], row_to_item)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((items, count_items(c, replicable)?))
}

pub fn count_items(c: &Connection, replicable: &str) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT COUNT(*) FROM items WHERE replicable = ?1",
        params![replicable],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
}

fn insert_event(
    tx: &Transaction<'_>,
    replicable: &str,
    id: &str,
    kind: EventKind,
    checksum: Option<&str>,
    at: i64,
) -> rusqlite::Result<GeoEvent> {
    tx.prepare_cached(
        "INSERT INTO events (replicable, item_id, kind, checksum, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![replicable, id, kind.as_str(), checksum, at])?;
    Ok(GeoEvent {
        id: tx.last_insert_rowid(),
        replicable: replicable.to_string(),
        item_id: id.to_string(),
        event: kind,
        checksum: checksum.map(str::to_string),
        at: ms_to_time(at),
    })
}

/// The row's `(fingerprint, checksum)`, if any.
fn current(
    tx: &Transaction<'_>,
    replicable: &str,
    id: &str,
) -> rusqlite::Result<Option<(String, String)>> {
    tx.prepare_cached(
        "SELECT fingerprint, checksum FROM items WHERE replicable = ?1 AND item_id = ?2",
    )?
    .query_row(params![replicable, id], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
}

fn holds(expect: &Expect, cur: &Option<(String, String)>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Fingerprint(fp) => fp.as_deref() == cur.as_ref().map(|c| c.0.as_str()),
    }
}

fn expectation_holds(
    tx: &Transaction<'_>,
    replicable: &str,
    id: &str,
    expect: &Expect,
) -> rusqlite::Result<bool> {
    Ok(holds(expect, &current(tx, replicable, id)?))
}

/// Applies new item states in one transaction: created/updated events for new items and
/// changed checksums. Returns the events and the ids whose expectation failed.
pub fn upsert_items(
    c: &mut Connection,
    replicable: &str,
    ups: &[Upsert],
) -> rusqlite::Result<(Vec<GeoEvent>, Vec<String>)> {
    let tx = c.transaction()?;
    let now = now_ms();
    let mut events = vec![];
    let mut conflicts = vec![];
    let any_paused = tx
        .prepare_cached("SELECT 1 FROM paused_deletes WHERE replicable = ?1 LIMIT 1")?
        .query_row(params![replicable], |_| Ok(()))
        .optional()?
        .is_some();
    for u in ups {
        let cur = current(&tx, replicable, &u.item_id)?;
        if !holds(&u.expect, &cur) {
            conflicts.push(u.item_id.clone());
            continue;
        }
        match cur.map(|c| c.1) {
            None => {
                tx.prepare_cached(
                    "INSERT INTO items (replicable, item_id, size, checksum, fingerprint, updated_at, verified_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                )?
                .execute(params![replicable, u.item_id, u.size as i64, u.checksum, u.fingerprint, now])?;
                events.push(insert_event(
                    &tx,
                    replicable,
                    &u.item_id,
                    EventKind::Created,
                    Some(&u.checksum),
                    now,
                )?);
            }
            Some(old) if old != u.checksum => {
                tx.prepare_cached(
                    "UPDATE items SET size = ?3, checksum = ?4, fingerprint = ?5, updated_at = ?6, verified_at = ?6,
                     verification_failure = NULL WHERE replicable = ?1 AND item_id = ?2",
                )?
                .execute(params![replicable, u.item_id, u.size as i64, u.checksum, u.fingerprint, now])?;
                events.push(insert_event(
                    &tx,
                    replicable,
                    &u.item_id,
                    EventKind::Updated,
                    Some(&u.checksum),
                    now,
                )?);
            }
            Some(_) => {
                tx.prepare_cached(
                    "UPDATE items SET size = ?3, fingerprint = ?4, verified_at = ?5, verification_failure = NULL
                     WHERE replicable = ?1 AND item_id = ?2",
                )?
                .execute(params![replicable, u.item_id, u.size as i64, u.fingerprint, now])?;
            }
        }
        if any_paused {
            // An item that is back is no longer a delete candidate.
            tx.prepare_cached("DELETE FROM paused_deletes WHERE replicable = ?1 AND item_id = ?2")?
                .execute(params![replicable, u.item_id])?;
        }
    }
    tx.commit()?;
    Ok((events, conflicts))
}

/// Records that an existing item could not be checksummed (kept with its last checksum).
pub fn record_verification_failure(
    c: &Connection,
    replicable: &str,
    id: &str,
    failure: &str,
) -> rusqlite::Result<()> {
    let f: String = failure.chars().take(255).collect();
    c.execute(
        "UPDATE items SET verification_failure = ?3 WHERE replicable = ?1 AND item_id = ?2",
        params![replicable, id, f],
    )?;
    Ok(())
}

/// Deletes items through the delete guard: if the deletes in the window plus these exceed
/// max(percent · items, min), or deletes of this replicable are already paused, they are
/// parked in `paused_deletes` instead (no events) until confirmed.
pub fn guarded_delete(
    c: &mut Connection,
    replicable: &str,
    candidates: &[(String, Expect)],
    guard: DeleteGuard,
) -> rusqlite::Result<DeleteOutcome> {
    let tx = c.transaction()?;
    let now = now_ms();
    let mut cands = vec![];
    for (id, expect) in candidates {
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM items WHERE replicable = ?1 AND item_id = ?2",
                params![replicable, id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists && expectation_holds(&tx, replicable, id, expect)? {
            cands.push(id.clone());
        }
    }
    let mut out = DeleteOutcome::default();
    if cands.is_empty() {
        tx.commit()?;
        return Ok(out);
    }
    tx.execute(
        "DELETE FROM delete_log WHERE at < ?1",
        params![now - guard.window_ms],
    )?;
    let recent: i64 = tx.query_row(
        "SELECT COUNT(*) FROM delete_log WHERE replicable = ?1",
        params![replicable],
        |r| r.get(0),
    )?;
    let total = count_items(&tx, replicable)?;
    let limit = (total * guard.percent / 100).max(guard.min);
    let paused_window: Option<String> = tx
        .query_row(
            "SELECT window_id FROM paused_deletes WHERE replicable = ?1 LIMIT 1",
            params![replicable],
            |r| r.get(0),
        )
        .optional()?;
    if paused_window.is_some() || recent as u64 + cands.len() as u64 > limit {
        let window = paused_window
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());
        for id in &cands {
            tx.execute(
                "INSERT INTO paused_deletes (replicable, item_id, window_id, detected_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(replicable, item_id) DO NOTHING",
                params![replicable, id, window, now],
            )?;
        }
        out.paused = Some(window);
    } else {
        for id in &cands {
            tx.execute(
                "DELETE FROM items WHERE replicable = ?1 AND item_id = ?2",
                params![replicable, id],
            )?;
            tx.execute(
                "INSERT INTO delete_log (replicable, at) VALUES (?1, ?2)",
                params![replicable, now],
            )?;
            out.events.push(insert_event(
                &tx,
                replicable,
                id,
                EventKind::Deleted,
                None,
                now,
            )?);
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Drops paused delete candidates that are back on disk (or no longer candidates).
pub fn retain_paused(
    c: &mut Connection,
    replicable: &str,
    still_missing: &std::collections::HashSet<String>,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    let ids: Vec<String> = {
        let mut st = tx.prepare("SELECT item_id FROM paused_deletes WHERE replicable = ?1")?;
        st.query_map(params![replicable], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for id in ids.iter().filter(|i| !still_missing.contains(*i)) {
        tx.execute(
            "DELETE FROM paused_deletes WHERE replicable = ?1 AND item_id = ?2",
            params![replicable, id],
        )?;
    }
    tx.commit()
}

pub fn paused(c: &Connection) -> rusqlite::Result<Vec<PausedRow>> {
    let mut st = c.prepare(
        "SELECT replicable, window_id, COUNT(*) FROM paused_deletes GROUP BY replicable, window_id ORDER BY replicable",
    )?;
    st.query_map([], |r| {
        Ok(PausedRow {
            replicable: r.get(0)?,
            window_id: r.get(1)?,
            count: r.get::<_, i64>(2)?.max(0) as u64,
        })
    })?
    .collect()
}

/// Paused candidates of the given window (every window when `None`).
pub fn paused_items(
    c: &Connection,
    window: Option<&str>,
) -> rusqlite::Result<Vec<(String, String, String)>> {
    let mut st = c.prepare(
        "SELECT replicable, item_id, window_id FROM paused_deletes WHERE ?1 IS NULL OR window_id = ?1",
    )?;
    st.query_map(params![window], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect()
}

/// Applies confirmed deletes (`(replicable, item_id, still_missing)`); confirmed deletes do
/// not count against the next window.
pub fn confirm_deletes(
    c: &mut Connection,
    rows: &[(String, String, bool)],
) -> rusqlite::Result<Vec<GeoEvent>> {
    let tx = c.transaction()?;
    let now = now_ms();
    let mut events = vec![];
    for (rep, id, missing) in rows {
        tx.execute(
            "DELETE FROM paused_deletes WHERE replicable = ?1 AND item_id = ?2",
            params![rep, id],
        )?;
        if *missing
            && tx.execute(
                "DELETE FROM items WHERE replicable = ?1 AND item_id = ?2",
                params![rep, id],
            )? > 0
        {
            events.push(insert_event(&tx, rep, id, EventKind::Deleted, None, now)?);
        }
    }
    let reps: std::collections::HashSet<&String> = rows.iter().map(|r| &r.0).collect();
    for rep in reps {
        tx.execute("DELETE FROM delete_log WHERE replicable = ?1", params![rep])?;
    }
    tx.commit()?;
    Ok(events)
}

pub fn read_events(c: &Connection, after: i64, limit: usize) -> rusqlite::Result<EventsRead> {
    let last = last_event_id(c)?;
    let pruned = pruned_through(c)?;
    if after < pruned {
        return Ok(EventsRead::Gone {
            oldest_id: pruned + 1,
            last_event_id: last,
        });
    }
    let mut st = c.prepare_cached(
        "SELECT id, replicable, item_id, kind, checksum, at FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let events = st
        .query_map(params![after, limit as i64], |r| {
            let kind: String = r.get(3)?;
            Ok(GeoEvent {
                id: r.get(0)?,
                replicable: r.get(1)?,
                item_id: r.get(2)?,
                event: match kind.as_str() {
                    "created" => EventKind::Created,
                    "deleted" => EventKind::Deleted,
                    _ => EventKind::Updated,
                },
                checksum: r.get(4)?,
                at: ms_to_time(r.get(5)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(EventsRead::Page {
        events,
        last_event_id: last,
    })
}

/// Stores an instance's report; its cursor counts only when it belongs to `log_id`.
pub fn store_report(c: &Connection, report: &StatusReport, log_id: &str) -> anyhow::Result<()> {
    let cursor = if report.log_id.as_deref() == Some(log_id) {
        report.cursor.max(0)
    } else {
        0
    };
    c.execute(
        "INSERT INTO instances (site, instance, log_id, cursor, report, reported_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(site, instance) DO UPDATE SET log_id = excluded.log_id, cursor = excluded.cursor,
         report = excluded.report, reported_at = excluded.reported_at",
        params![
            report.site,
            report.instance,
            report.log_id,
            cursor,
            serde_json::to_string(report)?,
            now_ms()
        ],
    )?;
    Ok(())
}

pub fn instances(c: &Connection) -> anyhow::Result<Vec<InstanceRow>> {
    let mut st = c.prepare(
        "SELECT site, instance, report, reported_at FROM instances ORDER BY site, instance",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = vec![];
    for row in rows {
        let (site, instance, report, reported_at) = row?;
        if let Ok(report) = serde_json::from_str(&report) {
            out.push(InstanceRow {
                site,
                instance,
                report,
                reported_at,
            });
        }
    }
    Ok(out)
}

/// Prunes events acknowledged by every instance of every known secondary site (`sites`), or
/// older than `retention_ms`; forgets instances silent for longer than the retention.
/// Returns the new `pruned_through`.
pub fn prune(
    c: &mut Connection,
    sites: &[String],
    log_id: &str,
    retention_ms: i64,
) -> rusqlite::Result<i64> {
    let tx = c.transaction()?;
    let now = now_ms();
    tx.execute(
        "DELETE FROM instances WHERE reported_at < ?1",
        params![now - retention_ms],
    )?;
    let mut all: Vec<String> = sites.to_vec();
    {
        let mut st = tx.prepare("SELECT DISTINCT site FROM instances")?;
        for s in st.query_map([], |r| r.get::<_, String>(0))? {
            all.push(s?);
        }
    }
    all.sort();
    all.dedup();
    let mut floor = if all.is_empty() { 0 } else { i64::MAX };
    for site in &all {
        // An instance on another log epoch has acknowledged nothing of this log.
        let m: Option<i64> = tx.query_row(
            "SELECT MIN(CASE WHEN log_id = ?2 THEN cursor ELSE 0 END) FROM instances WHERE site = ?1",
            params![site, log_id],
            |r| r.get(0),
        )?;
        floor = floor.min(m.unwrap_or(0));
    }
    let by_age: i64 = tx
        .query_row(
            "SELECT MAX(id) FROM events WHERE at < ?1",
            params![now - retention_ms],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .unwrap_or(0);
    let last = last_event_id(&tx)?;
    let upto = floor.max(by_age).min(last);
    let old = pruned_through(&tx)?;
    if upto > old {
        tx.execute("DELETE FROM events WHERE id <= ?1", params![upto])?;
        set_meta(&tx, "pruned_through", &upto.to_string())?;
    }
    tx.commit()?;
    Ok(upto.max(old))
}

pub fn storage_id(c: &Connection, replicable: &str) -> rusqlite::Result<Option<String>> {
    c.query_row(
        "SELECT storage_id FROM storage_ids WHERE replicable = ?1",
        params![replicable],
        |r| r.get(0),
    )
    .optional()
}

pub fn set_storage_id(c: &Connection, replicable: &str, id: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO storage_ids (replicable, storage_id) VALUES (?1, ?2)
         ON CONFLICT(replicable) DO UPDATE SET storage_id = excluded.storage_id",
        params![replicable, id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(id: &str, sum: &str, fp: &str) -> Upsert {
        Upsert {
            item_id: id.into(),
            size: 1,
            checksum: sum.into(),
            fingerprint: fp.into(),
            expect: Expect::Any,
        }
    }

    #[test]
    fn events_guard_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let (store, log_id) = Store::open(&dir.path().join("p.db")).unwrap();
        let (_, again) = Store::open(&dir.path().join("p.db")).unwrap();
        assert_eq!(log_id, again, "log_id is stored");
        let mut c = store.conn.lock().unwrap();
        let ups: Vec<_> = (0..10).map(|i| up(&format!("i{i}"), "a", "f")).collect();
        let (ev, _) = upsert_items(&mut c, "r", &ups).unwrap();
        assert_eq!(ev.len(), 10);
        // Same checksum, new fingerprint: no event. New checksum: updated.
        let (ev, _) = upsert_items(&mut c, "r", &[up("i0", "a", "g"), up("i1", "b", "g")]).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].event, EventKind::Updated);
        // Stale expectation → conflict.
        let mut stale = up("i2", "z", "h");
        stale.expect = Expect::Fingerprint(Some("old".into()));
        let (ev, conflicts) = upsert_items(&mut c, "r", &[stale]).unwrap();
        assert!(ev.is_empty());
        assert_eq!(conflicts, vec!["i2".to_string()]);

        let guard = DeleteGuard {
            window_ms: 600_000,
            min: 2,
            percent: 10,
        };
        let one = guarded_delete(&mut c, "r", &[("i9".into(), Expect::Any)], guard).unwrap();
        assert_eq!(one.events.len(), 1);
        let many: Vec<_> = (0..5).map(|i| (format!("i{i}"), Expect::Any)).collect();
        let out = guarded_delete(&mut c, "r", &many, guard).unwrap();
        assert!(out.events.is_empty());
        let window = out.paused.unwrap();
        assert_eq!(count_items(&c, "r").unwrap(), 9);
        let rows: Vec<_> = paused_items(&c, Some(&window))
            .unwrap()
            .into_iter()
            .map(|(r, i, _)| (r, i, true))
            .collect();
        assert_eq!(rows.len(), 5);
        assert_eq!(confirm_deletes(&mut c, &rows).unwrap().len(), 5);
        assert_eq!(count_items(&c, "r").unwrap(), 4);

        let last = last_event_id(&c).unwrap();
        assert_eq!(last, 17);
        // One known site, acknowledged up to 12.
        let rep = StatusReport {
            site: "tokyo".into(),
            instance: "a".into(),
            log_id: Some(log_id.clone()),
            cursor: 12,
            ..Default::default()
        };
        store_report(&c, &rep, &log_id).unwrap();
        assert_eq!(
            prune(&mut c, &["tokyo".into()], &log_id, 86_400_000).unwrap(),
            12
        );
        assert!(matches!(
            read_events(&c, 3, 10).unwrap(),
            EventsRead::Gone { oldest_id: 13, .. }
        ));
        match read_events(&c, 12, 10).unwrap() {
            EventsRead::Page { events, .. } => assert_eq!(events.len(), 5),
            other => panic!("{other:?}"),
        }
        // Another site that never reported holds pruning back.
        assert_eq!(
            prune(
                &mut c,
                &["tokyo".into(), "berlin".into()],
                &log_id,
                86_400_000
            )
            .unwrap(),
            12
        );
    }
}
