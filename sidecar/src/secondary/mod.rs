//! The secondary's replication: registry, workers, verification, status (DESIGN §6).
//! Owner: replication work (issue 5).
//!
//! Tasks started by [`Secondary::start`]:
//! - **event consumer**: long-polls `GET /api/v4/geo/events` from the durable cursor; created
//!   and updated events make rows pending, deletes remove the local copy and the row (through
//!   the delete guard). The first contact, a new `log_id` and `410 Gone` all move the cursor
//!   to the primary's head first and then backfill, so nothing that happens during the
//!   backfill is lost.
//! - **backfill / consistency pass** at start, every `geo.backfillInterval` and when the event
//!   consumer asks: pages through each replicable's catalog, creates missing rows, notices
//!   changed checksums and removes orphans (rows created before the pass that the catalog no
//!   longer lists, or that selective sync no longer selects), through the delete guard.
//! - one **dispatcher** per replicable claiming due rows up to `concurrency` in flight, and a
//!   **committer** writing finished syncs in grouped transactions.
//! - **verification**: re-checksums synced items older than the replicable's
//!   `verificationInterval`; a mismatch fails the row and resyncs it.
//! - **stuck rows**: `started` longer than `geo.syncTimeout` → failed.
//! - **status**: `GET /-/geo/status` on the admin port, metrics, and a report to the primary
//!   every `geo.statusInterval` (which acknowledges the cursor).
//!
//! Everything pauses while the primary URL is unknown or speaks another major Geo API version;
//! the status says why.
//!
//! Choices where DESIGN is silent:
//! - the token audience (primary site id) is the first peer site in `keys.trusted`
//!   ([`client::primary_site`]);
//! - selective sync is applied on top of the primary's catalog; the replicable's own
//!   include/exclude is the primary's business (its catalog lists only included items);
//! - an existing repository replica is fetched into directly, under the per-item lock (the
//!   fetch is the ref update, `--atomic`), after re-checking the claim;
//! - when the replica's checksum differs from the claimed one but equals what the primary
//!   reports now (`git ls-remote`), the row is synced with that checksum;
//! - the delete guard's window is kept in memory; a pause and its deferred deletes are durable.

pub mod client;
pub mod landing;
pub mod metrics;
pub mod registry;
pub mod sync;

use crate::context::{PrimaryWatch, SiteContext};
use crate::items::{Patterns, replicable_root};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use chrono::Utc;
use client::{ApiError, EventsResult, GeoClient};
use geoforge_crds::auth::Scope;
use geoforge_crds::config::ReplicableConfig;
use geoforge_crds::replicable::DataType;
use geoforge_crds::wire::{
    DeletesPaused, EventKind, GeoEvent, ItemLag, ReplicableReport, StatusReport,
};
use http::{HeaderMap, StatusCode};
use registry::{Claim, Cursor, Outcome, Registry};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sync::{ItemLocks, Syncer};
use tokio::sync::{Notify, mpsc};

/// Events per poll.
const EVENTS_LIMIT: usize = 500;
/// Catalog page size.
const CATALOG_LIMIT: usize = 1000;
/// Most lagging items in the status.
const LAGGING_N: usize = 10;

/// One configured replicable as the secondary sees it.
struct Rep {
    cfg: ReplicableConfig,
    root: PathBuf,
}

/// What the workers learnt at run time (for the status).
#[derive(Default)]
struct Runtime {
    primary_url: Option<String>,
    /// Why replication cannot proceed (version mismatch, unreachable), besides "primary unknown".
    blocked: Option<String>,
    last_event_id: i64,
    /// When the oldest event not processed yet happened.
    oldest_unprocessed: Option<chrono::DateTime<Utc>>,
    /// In-memory delete-guard window: times of admitted deletes per replicable.
    deletes: HashMap<String, VecDeque<Instant>>,
}

/// Replication of one secondary instance.
pub struct Secondary {
    ctx: SiteContext,
    registry: Arc<Registry>,
    reps: Vec<Rep>,
    selection: Patterns,
    locks: ItemLocks,
    lander: landing::Lander,
    runtime: Mutex<Runtime>,
    primary: PrimaryWatch,
    client: Option<GeoClient>,
    /// Wakes dispatchers (new due rows).
    work: Arc<Notify>,
    /// Asks for a backfill pass.
    backfill: Notify,
    metrics: metrics::ReplicationMetrics,
    outcomes: mpsc::UnboundedSender<(Outcome, Duration)>,
}

impl Secondary {
    /// Opens the registry and starts the event consumer, backfill, sync and verification workers.
    pub async fn start(ctx: SiteContext, primary: PrimaryWatch) -> anyhow::Result<Arc<Secondary>> {
        let path = ctx.config.state_dir.join("registry.db");
        let registry = tokio::task::spawn_blocking(move || Registry::open(&path)).await??;
        let reset = registry.run(|r| r.reset_started_after_restart()).await?;
        if reset > 0 {
            tracing::info!(
                rows = reset,
                "rows left started by a previous run are pending again"
            );
        }
        let sel = &ctx.config.selective_sync;
        let selection = Patterns::new(&sel.include, &sel.exclude)
            .map_err(|e| anyhow::anyhow!("selectiveSync: {e}"))?;
        let reps: Vec<Rep> = ctx
            .config
            .replicables
            .iter()
            .map(|r| Rep {
                cfg: r.clone(),
                root: replicable_root(&ctx.config, r),
            })
            .collect();
        for r in &reps {
            std::fs::create_dir_all(&r.root)?;
        }
        let client = match client::primary_site(&ctx) {
            Some(aud) => Some(GeoClient::new(&ctx, aud)),
            None => {
                tracing::error!(
                    "no peer site in keys.trusted: cannot address tokens to the primary; replication paused"
                );
                None
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let locks = ItemLocks::default();
        let me = Arc::new(Secondary {
            lander: landing::Lander::start(registry.clone(), locks.clone()),
            metrics: metrics::ReplicationMetrics::register(&ctx.metrics),
            ctx,
            registry,
            reps,
            selection,
            locks,
            runtime: Mutex::new(Runtime::default()),
            primary,
            client,
            work: Arc::new(Notify::new()),
            backfill: Notify::new(),
            outcomes: tx,
        });
        // Leftover temporaries of a killed process.
        let roots: Vec<PathBuf> = me.reps.iter().map(|r| r.root.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let n: usize = roots.iter().map(|r| sync::clean_tmp(r)).sum();
            if n > 0 {
                tracing::info!(removed = n, "removed temporary files of a previous run");
            }
        });
        if me.client.is_some() {
            tokio::spawn(me.clone().committer(rx));
            tokio::spawn(me.clone().event_loop());
            tokio::spawn(me.clone().backfill_loop());
            for i in 0..me.reps.len() {
                tokio::spawn(me.clone().dispatcher(i));
                tokio::spawn(me.clone().verification_loop(i));
            }
            tokio::spawn(me.clone().stuck_loop());
            tokio::spawn(me.clone().status_loop());
        }
        tokio::spawn(me.clone().metrics_loop());
        Ok(me)
    }

    /// Routes on the admin port (`/-/geo/status`, `/-/geo/confirm-deletes`).
    pub fn admin_routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/-/geo/status", get(status_route))
            .route("/-/geo/confirm-deletes", post(confirm_route))
            .with_state(self.clone())
    }

    /// Queues a sync of one item now (read-your-writes after a relayed push, acceleration misses).
    pub fn request_sync(&self, replicable: &str, item_id: &str) {
        let Some(rep) = self.reps.iter().find(|r| r.cfg.name == replicable) else {
            return;
        };
        if crate::items::validate_item_id(item_id).is_err() || !self.selection.matches(item_id) {
            return;
        }
        let (r, id) = (replicable.to_string(), item_id.to_string());
        let is_repo = rep.cfg.data_type == DataType::Repository;
        let reg = self.registry.clone();
        let me = self.work.clone();
        tokio::spawn(async move {
            let res = reg
                .run(move |reg| {
                    if reg.make_due(&r, &id)? {
                        return Ok(true);
                    }
                    // Unknown yet (the event has not arrived): a repository can be fetched
                    // without knowing its checksum; a blob waits for its event.
                    if is_repo {
                        reg.write(|tx| {
                            Registry::upsert_tx(tx, &r, &id, None, registry::now()).map(|_| ())
                        })?;
                        return Ok(true);
                    }
                    Ok(false)
                })
                .await;
            match res {
                Ok(true) => me.notify_waiters(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "request_sync"),
            }
        });
    }

    /// Whether an item's replica is synced (acceleration serves only those).
    pub async fn is_synced(&self, replicable: &str, item_id: &str) -> bool {
        let (r, id) = (replicable.to_string(), item_id.to_string());
        matches!(
            self.registry.run(move |reg| reg.row_state(&r, &id)).await,
            Ok(Some((registry::SYNCED, _)))
        )
    }

    /// Where an item's replica lives (whether or not it is synced); `None` for unknown
    /// replicables or ids that would leave the root.
    pub fn replica_path(&self, replicable: &str, item_id: &str) -> Option<PathBuf> {
        let rep = self.reps.iter().find(|r| r.cfg.name == replicable)?;
        crate::items::resolve_under(&rep.root, item_id).ok()
    }

    /// The registry (for tests and tools).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

/// Result of asking the delete guard.
enum Guard {
    Admit,
    Defer(String),
}

impl Secondary {
    fn rep(&self, name: &str) -> Option<&Rep> {
        self.reps.iter().find(|r| r.cfg.name == name)
    }

    /// The primary URL, waiting while it is unknown; `None` on shutdown.
    async fn primary_url(&self) -> Option<String> {
        let mut rx = self.primary.clone();
        loop {
            let cur = rx.borrow_and_update().clone();
            self.runtime.lock().expect("runtime").primary_url = cur.clone();
            if let Some(u) = cur {
                return Some(u);
            }
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return None,
                r = rx.changed() => if r.is_err() {
                    self.ctx.shutdown.cancelled().await;
                    return None;
                },
            }
        }
    }

    fn blocked(&self) -> Option<String> {
        self.runtime.lock().expect("runtime").blocked.clone()
    }

    fn set_blocked(&self, why: Option<String>) {
        let mut rt = self.runtime.lock().expect("runtime");
        if rt.blocked != why {
            match &why {
                Some(w) => tracing::warn!(reason = %w, "replication paused"),
                None => tracing::info!("replication resumed"),
            }
            rt.blocked = why;
        }
    }

    /// Sleeps `d` unless shutting down; false on shutdown.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    // ---- event consumer -------------------------------------------------------------------

    async fn event_loop(self: Arc<Self>) {
        let client = self.client.clone().expect("client");
        let wait = self
            .ctx
            .config
            .geo
            .max_long_poll
            .min(Duration::from_secs(25));
        let mut backoff = Duration::from_millis(500);
        loop {
            let Some(base) = self.primary_url().await else {
                return;
            };
            let cursor = match self.registry.run(|r| r.cursor()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "registry: cannot read the cursor");
                    if !self.sleep(Duration::from_secs(5)).await {
                        return;
                    }
                    continue;
                }
            };
            let res = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                r = client.events(&base, cursor.last_event_id, EVENTS_LIMIT, wait) => r,
            };
            match res {
                Ok(EventsResult::Page(page)) => {
                    backoff = Duration::from_millis(500);
                    self.set_blocked(None);
                    self.runtime.lock().expect("runtime").last_event_id = page.last_event_id;
                    if cursor.log_id.as_deref() != Some(page.log_id.as_str()) {
                        // First contact or a recreated log: cursor to the head, then backfill.
                        if cursor.log_id.is_some() {
                            tracing::warn!(old = ?cursor.log_id, new = %page.log_id, "the primary's event log was recreated: resetting the cursor and backfilling");
                        }
                        let c = Cursor {
                            log_id: Some(page.log_id.clone()),
                            last_event_id: page.last_event_id,
                        };
                        if let Err(e) = self
                            .registry
                            .run(move |r| r.write(|tx| Registry::set_cursor_tx(tx, &c)))
                            .await
                        {
                            tracing::error!(error = %e, "registry: cannot store the cursor");
                        }
                        self.backfill.notify_one();
                        continue;
                    }
                    if page.events.is_empty() {
                        self.runtime.lock().expect("runtime").oldest_unprocessed = None;
                        continue;
                    }
                    {
                        let mut rt = self.runtime.lock().expect("runtime");
                        if rt.oldest_unprocessed.is_none() {
                            rt.oldest_unprocessed = Some(page.events[0].at);
                        }
                    }
                    let last = page
                        .events
                        .last()
                        .map(|e| e.id)
                        .unwrap_or(cursor.last_event_id);
                    let last_at = page.events.last().map(|e| e.at);
                    let c = Cursor {
                        log_id: Some(page.log_id.clone()),
                        last_event_id: last,
                    };
                    match self.apply_events(page.events, c).await {
                        Ok(()) => {
                            let mut rt = self.runtime.lock().expect("runtime");
                            rt.oldest_unprocessed = if last >= page.last_event_id {
                                None
                            } else {
                                last_at
                            };
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "applying events failed; retrying");
                            if !self.sleep(Duration::from_secs(2)).await {
                                return;
                            }
                        }
                    }
                    self.work.notify_waiters();
                }
                Ok(EventsResult::Gone(g)) => {
                    tracing::warn!(
                        oldest = g.oldest_id,
                        cursor = cursor.last_event_id,
                        "events were pruned past the cursor: moving to the head, then backfilling"
                    );
                    self.runtime.lock().expect("runtime").last_event_id = g.last_event_id;
                    let c = Cursor {
                        log_id: Some(g.log_id),
                        last_event_id: g.last_event_id,
                    };
                    if let Err(e) = self
                        .registry
                        .run(move |r| r.write(|tx| Registry::set_cursor_tx(tx, &c)))
                        .await
                    {
                        tracing::error!(error = %e, "registry: cannot store the cursor");
                    }
                    self.backfill.notify_one();
                }
                Err(e) => {
                    self.set_blocked(Some(e.to_string()));
                    let d = if matches!(e, ApiError::Version { .. }) {
                        Duration::from_secs(30)
                    } else {
                        backoff
                    };
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                    if !self.sleep(d).await {
                        return;
                    }
                }
            }
        }
    }

    /// Asks the delete guard about `n` deletes in `replicable`.
    async fn guard(&self, replicable: &str, n: usize) -> anyhow::Result<Guard> {
        let r = replicable.to_string();
        let (paused, counts) = self
            .registry
            .run(move |reg| Ok((reg.paused_window(&r)?, reg.counts(&r)?)))
            .await?;
        if let Some((w, _)) = paused {
            return Ok(Guard::Defer(w));
        }
        let g = &self.ctx.config.geo;
        let threshold =
            ((counts.total().max(0) as u64) * g.delete_percent / 100).max(g.delete_min) as usize;
        let mut rt = self.runtime.lock().expect("runtime");
        let q = rt.deletes.entry(replicable.to_string()).or_default();
        let now = Instant::now();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > g.delete_window)
        {
            q.pop_front();
        }
        if q.len() + n > threshold {
            let window = format!(
                "{}-{}",
                replicable,
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            tracing::warn!(replicable, deletes = q.len() + n, threshold, window = %window,
                "mass delete paused: confirm with POST /-/geo/confirm-deletes?window_id=<window>");
            return Ok(Guard::Defer(window));
        }
        q.extend(std::iter::repeat_n(now, n));
        Ok(Guard::Admit)
    }

    /// Removes local copies of `ids` (each under its item lock).
    async fn remove_locals(&self, rep: &Rep, ids: &[String]) {
        for id in ids {
            let _g = self.locks.lock(&rep.cfg.name, id).await;
            if let Err(e) = sync::remove_local(&rep.root, id).await {
                tracing::warn!(replicable = %rep.cfg.name, item = %id, error = %e, "removing the local copy failed");
            }
        }
    }

    /// Decides deletes of `ids` in `replicable` through the guard: removes the admitted ones'
    /// local copies now and returns what to write (rows to delete, or rows to defer + window).
    async fn plan_deletes(
        &self,
        replicable: &str,
        ids: Vec<String>,
    ) -> anyhow::Result<(Vec<String>, Option<(String, Vec<String>)>)> {
        let Some(rep) = self.rep(replicable) else {
            return Ok((vec![], None));
        };
        if ids.is_empty() {
            return Ok((vec![], None));
        }
        match self.guard(replicable, ids.len()).await? {
            Guard::Admit => {
                self.remove_locals(rep, &ids).await;
                Ok((ids, None))
            }
            Guard::Defer(w) => Ok((vec![], Some((w, ids)))),
        }
    }

    async fn apply_events(
        self: &Arc<Self>,
        events: Vec<GeoEvent>,
        cursor: Cursor,
    ) -> anyhow::Result<()> {
        // Deletes of rows we have, per replicable (others are no-ops).
        let mut del: HashMap<String, Vec<String>> = HashMap::new();
        let cand: Vec<(String, String)> = events
            .iter()
            .filter(|e| e.event == EventKind::Deleted && self.rep(&e.replicable).is_some())
            .map(|e| (e.replicable.clone(), e.item_id.clone()))
            .collect();
        if !cand.is_empty() {
            let existing = self
                .registry
                .run(move |reg| {
                    let mut out = vec![];
                    for (r, id) in cand {
                        if reg.row_state(&r, &id)?.is_some() {
                            out.push((r, id));
                        }
                    }
                    Ok(out)
                })
                .await?;
            for (r, id) in existing {
                let v = del.entry(r).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
            }
        }
        let mut remove: HashSet<(String, String)> = HashSet::new();
        let mut defer: Vec<(String, String, Vec<String>)> = vec![];
        for (r, ids) in del {
            let (rm, df) = self.plan_deletes(&r, ids).await?;
            remove.extend(rm.into_iter().map(|id| (r.clone(), id)));
            if let Some((w, ids)) = df {
                defer.push((r, w, ids));
            }
        }
        let selected: Vec<bool> = events
            .iter()
            .map(|e| {
                self.rep(&e.replicable).is_some()
                    && self.selection.matches(&e.item_id)
                    && crate::items::validate_item_id(&e.item_id).is_ok()
            })
            .collect();
        self.registry
            .run(move |reg| {
                let t = registry::now();
                reg.write(|tx| {
                    for (r, w, ids) in &defer {
                        Registry::pause_tx(tx, r, w)?;
                        for id in ids {
                            Registry::defer_tx(tx, r, id, w)?;
                        }
                    }
                    for (e, sel) in events.iter().zip(selected) {
                        match e.event {
                            EventKind::Created | EventKind::Updated => {
                                if sel {
                                    Registry::upsert_tx(
                                        tx,
                                        &e.replicable,
                                        &e.item_id,
                                        e.checksum.as_deref(),
                                        t,
                                    )?;
                                }
                            }
                            EventKind::Deleted => {
                                if remove.contains(&(e.replicable.clone(), e.item_id.clone())) {
                                    Registry::remove_tx(tx, &e.replicable, &e.item_id)?;
                                }
                            }
                        }
                    }
                    Registry::set_cursor_tx(tx, &cursor)
                })
            })
            .await
    }

    // ---- backfill -----------------------------------------------------------------------

    async fn backfill_loop(self: Arc<Self>) {
        let interval = self.ctx.config.geo.backfill_interval;
        loop {
            let Some(base) = self.primary_url().await else {
                return;
            };
            if let Some(b) = self.blocked()
                && b.contains("Geo API version")
            {
                if !self.sleep(Duration::from_secs(5)).await {
                    return;
                }
                continue;
            }
            match self.backfill_pass(&base).await {
                Ok(()) => {
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(interval) => {},
                        _ = self.backfill.notified() => {},
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "backfill failed; retrying");
                    if !self.sleep(Duration::from_secs(5)).await {
                        return;
                    }
                }
            }
        }
    }

    async fn backfill_pass(self: &Arc<Self>, base: &str) -> anyhow::Result<()> {
        let client = self.client.clone().expect("client");
        for rep in &self.reps {
            let name = rep.cfg.name.clone();
            let start = registry::now() - 1;
            let mut seen: HashSet<String> = HashSet::new();
            let mut after: Option<String> = None;
            loop {
                let page = client
                    .catalog(base, &name, after.as_deref(), CATALOG_LIMIT)
                    .await?;
                let items: Vec<(String, String)> = page
                    .items
                    .into_iter()
                    .filter(|i| {
                        self.selection.matches(&i.id)
                            && crate::items::validate_item_id(&i.id).is_ok()
                    })
                    .map(|i| (i.id, i.checksum))
                    .collect();
                seen.extend(items.iter().map(|(id, _)| id.clone()));
                let n = name.clone();
                let changed = self
                    .registry
                    .run(move |reg| {
                        let t = registry::now();
                        reg.write(|tx| {
                            let mut changed = 0;
                            for (id, sum) in &items {
                                if Registry::upsert_tx(tx, &n, id, Some(sum), t)?
                                    != registry::Upsert::Unchanged
                                {
                                    changed += 1;
                                }
                            }
                            Ok(changed)
                        })
                    })
                    .await?;
                if changed > 0 {
                    self.work.notify_waiters();
                }
                match page.next_cursor {
                    Some(c) if Some(&c) != after.as_ref() => after = Some(c),
                    _ => break,
                }
            }
            let n = name.clone();
            let orphans: Vec<String> = self
                .registry
                .run(move |reg| reg.item_ids_before(&n, start))
                .await?
                .into_iter()
                .filter(|id| !seen.contains(id))
                .collect();
            if !orphans.is_empty() {
                tracing::info!(replicable = %name, orphans = orphans.len(), "consistency pass: removing items the primary no longer lists");
                let (rm, df) = self.plan_deletes(&name, orphans).await?;
                let n = name.clone();
                self.registry
                    .run(move |reg| {
                        reg.write(|tx| {
                            for id in &rm {
                                Registry::remove_tx(tx, &n, id)?;
                            }
                            if let Some((w, ids)) = &df {
                                Registry::pause_tx(tx, &n, w)?;
                                for id in ids {
                                    Registry::defer_tx(tx, &n, id, w)?;
                                }
                            }
                            Ok(())
                        })
                    })
                    .await?;
            }
        }
        Ok(())
    }

    // ---- sync workers --------------------------------------------------------------------

    async fn dispatcher(self: Arc<Self>, i: usize) {
        let rep = &self.reps[i];
        let name = rep.cfg.name.clone();
        let limit = rep.cfg.concurrency.max(1) as usize;
        let sem = Arc::new(tokio::sync::Semaphore::new(limit));
        let mut queue: VecDeque<Claim> = VecDeque::with_capacity(limit);
        let syncer = Syncer {
            config: self.ctx.config.clone(),
            registry: self.registry.clone(),
            locks: self.locks.clone(),
            client: self.client.clone().expect("client"),
            lander: self.lander.clone(),
        };
        loop {
            let Some(base) = self.primary_url().await else {
                return;
            };
            if self.blocked().is_some() {
                if !queue.is_empty() {
                    let q: Vec<Claim> = queue.drain(..).collect();
                    if let Err(e) = self.registry.run(move |r| r.release(&q)).await {
                        tracing::warn!(error = %e, "registry: releasing queued claims failed (the stuck-row timeout will)");
                    }
                }
                if !self.sleep(Duration::from_millis(500)).await {
                    return;
                }
                continue;
            }
            // Claims are taken a full `concurrency` at a time, ahead of free workers: one claim
            // transaction per batch rather than per finished item. Queued claims wait at most
            // one batch's sync time, far below the stuck-row timeout.
            if queue.is_empty() {
                // Registered before claiming, so a wake-up during the claim is not lost.
                let notified = self.work.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let nm = name.clone();
                match self.registry.run(move |r| r.claim_due(&nm, limit)).await {
                    Ok(c) if !c.is_empty() => queue.extend(c),
                    Ok(_) => {
                        tokio::select! {
                            _ = self.ctx.shutdown.cancelled() => return,
                            _ = notified => {},
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "registry: claiming failed");
                        if !self.sleep(Duration::from_secs(1)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let permit = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                p = sem.clone().acquire_owned() => p.expect("semaphore"),
            };
            let Some(claim) = queue.pop_front() else {
                continue;
            };
            let me = self.clone();
            let syncer = syncer.clone();
            let base = base.clone();
            let cfg = rep.cfg.clone();
            tokio::spawn(async move {
                me.run_sync(&syncer, &base, &cfg, claim, permit).await;
            });
        }
    }

    async fn run_sync(
        &self,
        syncer: &Syncer,
        base: &str,
        cfg: &ReplicableConfig,
        claim: Claim,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let started = Instant::now();
        let (r, id) = (claim.replicable.clone(), claim.item_id.clone());
        let out = syncer.sync(base, cfg, claim, slot).await;
        let took = started.elapsed();
        self.metrics
            .sync_duration
            .get_or_create(&metrics::labels(&r))
            .observe(took.as_secs_f64());
        match out {
            Some(o) => {
                let _ = self.outcomes.send((o, took));
            }
            None => {
                tracing::info!(replicable = %r, item = %id, "sync result discarded: the row was reset meanwhile")
            }
        }
    }

    /// Writes finished syncs in grouped transactions.
    async fn committer(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(Outcome, Duration)>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::sleep(Duration::from_millis(5));
            tokio::pin!(deadline);
            while batch.len() < 512 {
                tokio::select! {
                    x = rx.recv() => match x { Some(x) => batch.push(x), None => break },
                    _ = &mut deadline => break,
                }
            }
            let outcomes: Vec<Outcome> = batch.iter().map(|(o, _)| o.clone()).collect();
            let res = self.registry.run(move |r| r.finish(&outcomes)).await;
            match res {
                Ok(applied) => {
                    for ((o, took), ok) in batch.iter().zip(applied) {
                        let c = o.claim();
                        match (o, ok) {
                            (_, false) => {
                                tracing::info!(replicable = %c.replicable, item = %c.item_id, "sync result discarded: the row was reset meanwhile")
                            }
                            (Outcome::Synced { .. }, true) => {
                                tracing::debug!(replicable = %c.replicable, item = %c.item_id, took_ms = took.as_millis() as u64, "synced")
                            }
                            (Outcome::Moved { .. }, true) => {
                                tracing::info!(replicable = %c.replicable, item = %c.item_id, "the primary moved on during the sync: pending again")
                            }
                            (Outcome::Failed { reason, .. }, true) => {
                                tracing::warn!(replicable = %c.replicable, item = %c.item_id, reason = %registry::clip_failure(reason), "sync failed")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "registry: recording sync results failed (rows stay started and are retried)")
                }
            }
            self.work.notify_waiters();
        }
    }

    async fn stuck_loop(self: Arc<Self>) {
        let t = self.ctx.config.geo.sync_timeout;
        let tick = (t / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        while self.sleep(tick).await {
            let secs = t.as_secs().max(1) as i64;
            match self.registry.run(move |r| r.fail_stuck(secs)).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    rows = n,
                    "rows started too long ago are failed (sync timed out)"
                ),
                Err(e) => tracing::error!(error = %e, "registry: stuck-row check failed"),
            }
        }
    }

    // ---- verification ---------------------------------------------------------------------

    async fn verification_loop(self: Arc<Self>, i: usize) {
        let rep = &self.reps[i];
        let interval = rep.cfg.verification_interval;
        let tick = (interval / 10).clamp(Duration::from_millis(500), Duration::from_secs(60));
        while self.sleep(tick).await {
            let name = rep.cfg.name.clone();
            let older = registry::now() - interval.as_secs() as i64;
            let jobs = match self
                .registry
                .run(move |r| r.due_verification(&name, older, 256))
                .await
            {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "registry: verification query failed");
                    continue;
                }
            };
            if jobs.is_empty() {
                continue;
            }
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                let _g = self.locks.lock(&job.replicable, &job.item_id).await;
                let res = match crate::items::resolve_under(&rep.root, &job.item_id) {
                    Err(e) => Err(e.to_string()),
                    Ok(p) => match rep.cfg.data_type {
                        DataType::Blob => crate::checksum::blob_checksum(&p)
                            .await
                            .map(|(s, _)| s)
                            .map_err(|e| format!("replica unreadable: {e}")),
                        DataType::Repository => {
                            if tokio::fs::metadata(&p).await.is_ok_and(|m| m.is_dir()) {
                                crate::checksum::repository_checksum(&p)
                                    .await
                                    .map_err(|e| e.to_string())
                            } else {
                                Err("replica missing".into())
                            }
                        }
                    },
                };
                results.push((job, res));
            }
            match self
                .registry
                .run(move |r| r.verification_result(&results))
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(replicable = %rep.cfg.name, items = n, "verification found replicas differing from the primary: resyncing");
                    self.work.notify_waiters();
                }
                Err(e) => tracing::error!(error = %e, "registry: recording verification failed"),
            }
        }
    }

    // ---- status -------------------------------------------------------------------------

    /// This instance's status (reads counters and index ranges only).
    pub async fn status(&self) -> anyhow::Result<StatusReport> {
        let reps: Vec<(String, bool)> = self
            .reps
            .iter()
            .map(|r| (r.cfg.name.clone(), r.cfg.data_type == DataType::Repository))
            .collect();
        let (cursor, per, lagging) = self
            .registry
            .run(move |reg| {
                let cursor = reg.cursor()?;
                let t = registry::now();
                let mut per = vec![];
                let mut lagging: Vec<ItemLag> = vec![];
                for (name, is_repo) in &reps {
                    let c = reg.counts(name)?;
                    let oldest = reg.oldest_pending_since(name)?;
                    let paused = match reg.paused_window(name)? {
                        Some((w, _)) => {
                            let n = reg.deferred_count(name)?;
                            Some(DeletesPaused {
                                message: format!("{n} deletes paused: confirm with POST /-/geo/confirm-deletes?window_id={w}"),
                                window_id: w,
                                count: n as u64,
                            })
                        }
                        None => None,
                    };
                    per.push(ReplicableReport {
                        replicable: name.clone(),
                        total: c.total(),
                        synced: c.synced,
                        failed: c.failed,
                        pending: c.pending,
                        started: c.started,
                        verified: c.verified,
                        verification_failed: c.verification_failed,
                        oldest_pending_seconds: oldest.map(|s| (t - s).max(0)).unwrap_or(0),
                        deletes_paused: paused,
                    });
                    if *is_repo {
                        for (id, since) in reg.most_lagging(name, LAGGING_N)? {
                            lagging.push(ItemLag {
                                replicable: name.clone(),
                                item_id: id,
                                lag_seconds: (t - since).max(0),
                            });
                        }
                    }
                }
                lagging.sort_by_key(|l| std::cmp::Reverse(l.lag_seconds));
                lagging.truncate(LAGGING_N);
                Ok((cursor, per, lagging))
            })
            .await?;
        let rt = self.runtime.lock().expect("runtime");
        let paused = if self.client.is_none() {
            Some(
                "no peer site in keys.trusted: the primary's site id (token audience) is unknown"
                    .to_string(),
            )
        } else if rt.primary_url.is_none() {
            Some("primary unknown (no primary URL)".to_string())
        } else {
            rt.blocked.clone()
        };
        Ok(StatusReport {
            site: self.ctx.site_id().to_string(),
            instance: self.ctx.instance.clone(),
            role: "secondary".into(),
            version: crate::VERSION.into(),
            geo_api_version: geoforge_crds::GEO_API_VERSION.into(),
            log_id: cursor.log_id,
            cursor: cursor.last_event_id,
            last_event_id: rt.last_event_id.max(cursor.last_event_id),
            lag_seconds: rt
                .oldest_unprocessed
                .map(|t| (Utc::now() - t).num_seconds().max(0))
                .unwrap_or(0),
            replicables: per,
            lagging,
            paused,
            primary_url: rt.primary_url.clone(),
            reported_at: Utc::now(),
        })
    }

    async fn status_loop(self: Arc<Self>) {
        let client = self.client.clone().expect("client");
        let mut last_err: Option<String> = None;
        loop {
            let Some(base) = self.primary_url().await else {
                return;
            };
            if self.blocked().is_none() {
                let r = match self.status().await {
                    Ok(s) => client
                        .post_status(&base, &s)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let err = r.err();
                if err != last_err {
                    match &err {
                        Some(e) => {
                            tracing::warn!(error = %e, "status report to the primary failed")
                        }
                        None => tracing::info!("status reported to the primary"),
                    }
                    last_err = err;
                }
            }
            if !self.sleep(self.ctx.config.geo.status_interval).await {
                return;
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        loop {
            if let Ok(s) = self.status().await {
                let m = &self.metrics;
                for r in &s.replicables {
                    let l = metrics::labels(&r.replicable);
                    m.synced.get_or_create(&l).set(r.synced);
                    m.failed.get_or_create(&l).set(r.failed);
                    m.registry.get_or_create(&l).set(r.total);
                    m.verified.get_or_create(&l).set(r.verified);
                    m.verification_failed
                        .get_or_create(&l)
                        .set(r.verification_failed);
                }
                m.cursor.set(s.cursor);
                m.last_event_id.set(s.last_event_id);
                m.lag.set(s.lag_seconds);
            }
            if !self.sleep(Duration::from_secs(2)).await {
                return;
            }
        }
    }

    /// Applies the deferred deletes paused under `window_id`.
    async fn confirm_deletes(&self, window_id: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut done = vec![];
        for rep in &self.reps {
            let name = rep.cfg.name.clone();
            let n = name.clone();
            let (paused, ids) = self
                .registry
                .run(move |reg| Ok((reg.paused_window(&n)?, reg.deferred(&n)?)))
                .await?;
            if paused.as_ref().map(|(w, _)| w.as_str()) != Some(window_id) {
                continue;
            }
            self.remove_locals(rep, &ids).await;
            let n = name.clone();
            let count = ids.len();
            self.registry
                .run(move |reg| {
                    reg.write(|tx| {
                        for id in &ids {
                            Registry::remove_tx(tx, &n, id)?;
                        }
                        Registry::unpause_tx(tx, &n)
                    })
                })
                .await?;
            self.runtime.lock().expect("runtime").deletes.remove(&name);
            tracing::info!(replicable = %name, window = window_id, deleted = count, "paused deletes confirmed and applied");
            done.push(
                serde_json::json!({"replicable": name, "window_id": window_id, "deleted": count}),
            );
        }
        Ok(done)
    }
}

// ---- admin routes -----------------------------------------------------------------------

fn admin_auth(me: &Secondary, headers: &HeaderMap) -> Result<(), Box<crate::http_util::Resp>> {
    let h = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let site = me.ctx.site_id();
    match me.ctx.keyring.verify_authorization(h, site, Scope::Admin) {
        Ok(v) if v.site == site => Ok(()),
        Ok(_) => Err(Box::new(crate::http_util::error(
            StatusCode::UNAUTHORIZED,
            "admin tokens must be signed with this site's own key",
            true,
        ))),
        Err(e) => Err(Box::new(crate::http_util::error(
            StatusCode::UNAUTHORIZED,
            &e.to_string(),
            true,
        ))),
    }
}

async fn status_route(
    State(me): State<Arc<Secondary>>,
    headers: HeaderMap,
) -> crate::http_util::Resp {
    if let Err(r) = admin_auth(&me, &headers) {
        return *r;
    }
    match me.status().await {
        Ok(s) => crate::http_util::json(StatusCode::OK, &s),
        Err(e) => {
            tracing::error!(error = %e, "status");
            crate::http_util::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry unavailable",
                true,
            )
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct ConfirmQuery {
    window_id: Option<String>,
}

async fn confirm_route(
    State(me): State<Arc<Secondary>>,
    headers: HeaderMap,
    Query(q): Query<ConfirmQuery>,
    body: axum::body::Bytes,
) -> crate::http_util::Resp {
    if let Err(r) = admin_auth(&me, &headers) {
        return *r;
    }
    let window = q.window_id.or_else(|| {
        serde_json::from_slice::<ConfirmQuery>(&body)
            .ok()
            .and_then(|b| b.window_id)
    });
    let Some(window) = window else {
        return crate::http_util::error(
            StatusCode::BAD_REQUEST,
            "give the window id to confirm: ?window_id=… or {\"window_id\": …} (see /-/geo/status)",
            true,
        );
    };
    match me.confirm_deletes(&window).await {
        Ok(done) if done.is_empty() => crate::http_util::error(
            StatusCode::NOT_FOUND,
            "no deletes are paused under this window id",
            true,
        ),
        Ok(done) => {
            crate::http_util::json(StatusCode::OK, &serde_json::json!({ "confirmed": done }))
        }
        Err(e) => {
            tracing::error!(error = %e, "confirm-deletes");
            crate::http_util::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry unavailable",
                true,
            )
        }
    }
}
