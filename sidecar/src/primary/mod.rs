//! The primary's Geo API: catalog, event log, transfers (DESIGN §4). Owner: Geo API work (issue 4).
//!
//! - [`store`]: SQLite (`stateDir/primary.db`): catalog, events, instance reports, delete guard.
//! - [`scan`]: finding items on disk, change fingerprints, the storage identity marker.
//! - [`api`]: the routes (service port `/api/v4/geo/…`, admin port `/-/geo/…`).
//! - [`gitpack`]: `git upload-pack` for secondaries.
//!
//! Decisions where DESIGN is silent (safe choices):
//! - **The disk is the truth.** A push, a hook or a rescan only *triggers* a look at the item:
//!   the event recorded is what the disk shows (created/updated with the recomputed checksum, or
//!   deleted when it is gone). A hook saying "deleted" for an item still on disk records nothing.
//! - **Storage identity marker** (`.geoforge-storage-id` in each replicable's root): created by
//!   the sidecar only while the catalog of that replicable is empty (first start: nothing could
//!   be deleted by mistake), creating the root if needed. Later, without the marker (or with a
//!   different id than the one recorded), the rescan refuses to run and the status says why
//!   and how to restore it (`echo <id> > <root>/.geoforge-storage-id`). No deletes happen then,
//!   also not through hooks or pushes.
//! - **Delete guard**: every delete (rescan, hook, push) passes the guard; once a replicable has
//!   paused deletes, further deletes join the pause until `POST /-/geo/confirm-deletes`.
//!   Paused candidates that come back on disk leave the pause.
//! - **Item ids with percent-escapes** (a file literally named `%2e`) are not catalogued: an id
//!   is decoded from its URL segment exactly once, and a decoded id that still contains an
//!   escape is refused as double encoding (400).
//! - **Catalog cursor** is the row's insertion sequence: items created while a client pages
//!   appear after the cursor, so nothing is skipped or repeated.

pub mod api;
pub mod gitpack;
pub mod scan;
pub mod store;

use crate::context::{CompletedPush, PushSink, SiteContext};
use crate::items::{Patterns, RepoMapper, replicable_root, resolve_under};
use futures::StreamExt;
use geoforge_crds::replicable::DataType;
use geoforge_crds::wire::GeoEvent;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{DeleteGuard, Expect, Store, Upsert};

type Labels = Vec<(String, String)>;

/// Metrics of the primary.
#[derive(Clone, Default)]
pub struct PrimaryMetrics {
    pub last_event_id: Gauge,
    pub long_polls: Gauge,
    pub catalog_items: Family<Labels, Gauge>,
    pub scan_done: Family<Labels, Gauge>,
    pub scan_total: Family<Labels, Gauge>,
    pub scan_refused: Family<Labels, Gauge>,
    pub deletes_paused: Family<Labels, Gauge>,
    pub events: Family<Labels, Counter>,
    pub auth_failures: Family<Labels, Counter>,
}

impl PrimaryMetrics {
    fn register(ctx: &SiteContext) -> Self {
        let m = PrimaryMetrics::default();
        let r = &ctx.metrics;
        r.register(
            "geo_last_event_id",
            "Newest event id in the primary's log",
            m.last_event_id.clone(),
        );
        r.register(
            "geo_events_long_polls_waiting",
            "Event long-polls waiting for a commit",
            m.long_polls.clone(),
        );
        r.register(
            "geo_catalog_items",
            "Items in the primary's catalog",
            m.catalog_items.clone(),
        );
        r.register(
            "geo_catalog_scan_done_items",
            "Items looked at by the running (or last) scan",
            m.scan_done.clone(),
        );
        r.register(
            "geo_catalog_scan_found_items",
            "Items found on disk by the running (or last) scan",
            m.scan_total.clone(),
        );
        r.register(
            "geo_catalog_scan_refused",
            "1 while the scan refuses to run (storage identity marker missing or changed)",
            m.scan_refused.clone(),
        );
        r.register(
            "geo_deletes_paused",
            "Deletes awaiting confirmation (mass-delete guard)",
            m.deletes_paused.clone(),
        );
        r.register("geo_events", "Events recorded, by kind", m.events.clone());
        r.register(
            "geo_api_auth_failures",
            "Refused Geo API tokens, by route",
            m.auth_failures.clone(),
        );
        m
    }
}

fn rep_label(name: &str) -> Labels {
    vec![("replicable".to_string(), name.to_string())]
}

/// A configured replicable.
pub struct Rep {
    pub name: String,
    pub kind: DataType,
    pub root: PathBuf,
    pub patterns: Patterns,
}

/// Per-replicable scan state, for status.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScanState {
    /// Why the scan refuses to run (marker missing/changed, root unreadable).
    pub refused: Option<String>,
    pub last_scan_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_scan_seconds: Option<f64>,
    pub found: u64,
    pub checksummed: u64,
    pub skipped: u64,
    pub failures: u64,
    pub running: bool,
}

/// The primary's replication source.
pub struct Primary {
    ctx: SiteContext,
    store: Store,
    log_id: String,
    head: tokio::sync::watch::Sender<i64>,
    reps: Vec<Rep>,
    mapper: RepoMapper,
    /// SHA-256 of the hook token (compared in constant time).
    hook_token: Option<[u8; 32]>,
    scan_state: Mutex<HashMap<String, ScanState>>,
    scan_lock: tokio::sync::Mutex<()>,
    checksum_slots: Arc<tokio::sync::Semaphore>,
    metrics: PrimaryMetrics,
}

impl Primary {
    /// Opens the catalog and event log and starts the rescan loop.
    pub async fn start(ctx: SiteContext) -> anyhow::Result<Arc<Primary>> {
        let db_path = ctx.config.state_dir.join("primary.db");
        let path = db_path.clone();
        let (store, log_id) = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        let mut reps = vec![];
        for r in &ctx.config.replicables {
            reps.push(Rep {
                name: r.name.clone(),
                kind: r.data_type,
                root: replicable_root(&ctx.config, r),
                patterns: Patterns::new(&r.include, &r.exclude)
                    .map_err(|e| anyhow::anyhow!("replicable {}: {e}", r.name))?,
            });
        }
        let mapper = RepoMapper::new(&ctx.config).map_err(anyhow::Error::msg)?;
        let hook_token = match ctx
            .config
            .forge
            .as_ref()
            .and_then(|f| f.hook_token_file.as_ref())
        {
            Some(f) => {
                let t = crate::settings::read_secret(f).map_err(|e| {
                    anyhow::anyhow!("forge.hookTokenFile {}: cannot read: {e}", f.display())
                })?;
                if t.is_empty() {
                    anyhow::bail!("forge.hookTokenFile {}: empty", f.display());
                }
                Some(sha256(t.as_bytes()))
            }
            None => None,
        };
        let metrics = PrimaryMetrics::register(&ctx);
        let st = store.clone();
        let last = st.call(|c| Ok(store::last_event_id(c)?)).await?;
        metrics.last_event_id.set(last);
        let (head, _) = tokio::sync::watch::channel(last);
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8);
        tracing::info!(db = %db_path.display(), %log_id, last_event_id = last, "primary catalog and event log open");
        let p = Arc::new(Primary {
            ctx,
            store,
            log_id,
            head,
            reps,
            mapper,
            hook_token,
            scan_state: Mutex::new(HashMap::new()),
            scan_lock: tokio::sync::Mutex::new(()),
            checksum_slots: Arc::new(tokio::sync::Semaphore::new(parallel)),
            metrics,
        });
        p.refresh_gauges().await;
        tokio::spawn(p.clone().rescan_loop());
        tokio::spawn(p.clone().prune_loop());
        Ok(p)
    }

    /// Routes under `/api/v4/geo/` on the service port.
    pub fn geo_api(self: &Arc<Self>) -> axum::Router {
        api::geo_routes(self.clone())
    }

    /// Routes on the admin port (`/-/geo/status`, `/-/geo/confirm-deletes`).
    pub fn admin_routes(self: &Arc<Self>) -> axum::Router {
        api::admin_routes(self.clone())
    }

    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    fn rep(&self, name: &str) -> Option<&Rep> {
        self.reps.iter().find(|r| r.name == name)
    }

    fn guard(&self) -> DeleteGuard {
        let g = &self.ctx.config.geo;
        DeleteGuard {
            window_ms: g.delete_window.as_millis() as i64,
            min: g.delete_min,
            percent: g.delete_percent,
        }
    }

    /// Publishes committed events (wakes long-polls, updates metrics).
    fn published(&self, events: &[GeoEvent]) {
        if let Some(max) = events.iter().map(|e| e.id).max() {
            for e in events {
                self.metrics
                    .events
                    .get_or_create(&vec![("event".to_string(), e.event.as_str().to_string())])
                    .inc();
                tracing::debug!(id = e.id, replicable = %e.replicable, item = %e.item_id, event = e.event.as_str(), "event recorded");
            }
            self.head.send_if_modified(|cur| {
                if max > *cur {
                    *cur = max;
                    true
                } else {
                    false
                }
            });
            self.metrics.last_event_id.set(max);
        }
    }

    async fn refresh_gauges(&self) {
        let names: Vec<String> = self.reps.iter().map(|r| r.name.clone()).collect();
        let counts = self
            .store
            .call(move |c| {
                let mut out = vec![];
                for n in names {
                    out.push((n.clone(), store::count_items(c, &n)?));
                }
                Ok((out, store::paused(c)?))
            })
            .await;
        if let Ok((counts, paused)) = counts {
            for (n, k) in counts {
                self.metrics
                    .catalog_items
                    .get_or_create(&rep_label(&n))
                    .set(k as i64);
                let p = paused
                    .iter()
                    .filter(|p| p.replicable == n)
                    .map(|p| p.count)
                    .sum::<u64>();
                self.metrics
                    .deletes_paused
                    .get_or_create(&rep_label(&n))
                    .set(p as i64);
            }
        }
    }

    /// Checks the storage identity marker of a replicable (creating it on a first start).
    async fn check_marker(&self, rep: &Rep) -> Result<(), String> {
        let root = rep.root.clone();
        let name = rep.name.clone();
        let r = self
            .store
            .call(move |c| {
                let recorded = store::storage_id(c, &name)?;
                let marker = root.join(scan::MARKER);
                match scan::read_marker(&root) {
                    Err(e) => Ok(Err(format!("cannot read {}: {e}", marker.display()))),
                    Ok(scan::MarkerState::Present(id)) => match recorded {
                        Some(r) if r != id => Ok(Err(format!(
                            "storage identity marker {} says {id} but the catalog was built from storage {r}: \
                             refusing to scan (no deletes). Mount the right volume, or if this storage replaces \
                             the old one on purpose, write the recorded id into the marker: echo {r} > {}",
                            marker.display(),
                            marker.display()
                        ))),
                        Some(_) => Ok(Ok(())),
                        None => {
                            store::set_storage_id(c, &name, &id)?;
                            Ok(Ok(()))
                        }
                    },
                    Ok(scan::MarkerState::Missing) => {
                        if recorded.is_none() && store::count_items(c, &name)? == 0 {
                            let id = scan::create_marker(&root).map_err(|e| {
                                anyhow::anyhow!("cannot create {}: {e}", marker.display())
                            })?;
                            store::set_storage_id(c, &name, &id)?;
                            tracing::info!(marker = %marker.display(), "created the storage identity marker (empty catalog)");
                            Ok(Ok(()))
                        } else {
                            let hint = recorded.unwrap_or_else(|| "<storage id>".into());
                            Ok(Err(format!(
                                "storage identity marker {} is missing: the volume may be unmounted or empty; \
                                 refusing to scan (no deletes). If this is the right storage, restore it: echo {hint} > {}",
                                marker.display(),
                                marker.display()
                            )))
                        }
                    }
                }
            })
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => Err(format!("{e:#}")),
        };
        self.metrics
            .scan_refused
            .get_or_create(&rep_label(&rep.name))
            .set(i64::from(r.is_err()));
        r
    }

    async fn checksum(&self, rep: &Rep, path: PathBuf) -> std::io::Result<(String, u64)> {
        let _slot = self.checksum_slots.acquire().await;
        match rep.kind {
            DataType::Blob => crate::checksum::blob_checksum(&path).await,
            DataType::Repository => {
                let sum = crate::checksum::repository_checksum(&path).await?;
                let size = tokio::task::spawn_blocking(move || scan::repo_size(&path))
                    .await
                    .unwrap_or(0);
                Ok((sum, size))
            }
        }
    }

    /// Looks at one item on disk and records what changed (created/updated/deleted) durably.
    /// Returns the events committed.
    pub async fn refresh_item(&self, replicable: &str, id: &str) -> anyhow::Result<Vec<GeoEvent>> {
        let rep = self
            .rep(replicable)
            .ok_or_else(|| anyhow::anyhow!("unknown replicable {replicable}"))?;
        if !scan::servable_id(id) || !rep.patterns.matches(id) {
            anyhow::bail!("{id:?} is not an item of {replicable}");
        }
        let path = resolve_under(&rep.root, id)?;
        for _ in 0..8 {
            let (name, iid) = (rep.name.clone(), id.to_string());
            let prev = self
                .store
                .call(move |c| Ok(store::get_item(c, &name, &iid)?))
                .await?;
            let (kind, p) = (rep.kind, path.clone());
            let found = tokio::task::spawn_blocking(move || scan::stat_item(kind, &p)).await?;
            let expect = Expect::Fingerprint(prev.as_ref().map(|p| p.fingerprint.clone()));
            let Some(found) = found else {
                if prev.is_none() {
                    return Ok(vec![]);
                }
                if let Err(why) = self.check_marker(rep).await {
                    tracing::warn!(replicable = %rep.name, "not deleting {id:?}: {why}");
                    return Ok(vec![]);
                }
                let (name, cands, guard) = (
                    rep.name.clone(),
                    vec![(id.to_string(), expect)],
                    self.guard(),
                );
                let out = self
                    .store
                    .call(move |c| Ok(store::guarded_delete(c, &name, &cands, guard)?))
                    .await?;
                if let Some(w) = &out.paused {
                    tracing::warn!(replicable = %rep.name, window = %w, "delete of {id:?} paused: confirm with POST /-/geo/confirm-deletes");
                }
                self.published(&out.events);
                self.refresh_gauges().await;
                return Ok(out.events);
            };
            let (checksum, size) = self.checksum(rep, path.clone()).await?;
            let size = if rep.kind == DataType::Blob {
                found.size
            } else {
                size
            };
            let up = Upsert {
                item_id: id.to_string(),
                size,
                checksum,
                fingerprint: found.fingerprint,
                expect,
            };
            let name = rep.name.clone();
            let (events, conflicts) = self
                .store
                .call(move |c| Ok(store::upsert_items(c, &name, &[up])?))
                .await?;
            if conflicts.is_empty() {
                self.published(&events);
                if prev.is_none() {
                    self.refresh_gauges().await;
                }
                return Ok(events);
            }
            // Someone else recorded a newer state meanwhile: look again.
        }
        anyhow::bail!("{replicable}/{id:?} keeps changing; the next rescan records it")
    }

    async fn rescan_loop(self: Arc<Self>) {
        let interval = self
            .ctx
            .config
            .geo
            .rescan_interval
            .max(Duration::from_millis(200));
        loop {
            self.rescan_all().await;
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Rescans every replicable once.
    pub async fn rescan_all(&self) {
        let _one = self.scan_lock.lock().await;
        for rep in &self.reps {
            if self.ctx.shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = self.rescan(rep).await {
                tracing::warn!(replicable = %rep.name, "rescan failed: {e:#}");
            }
        }
        self.refresh_gauges().await;
    }

    fn set_state(&self, name: &str, f: impl FnOnce(&mut ScanState)) {
        if let Ok(mut m) = self.scan_state.lock() {
            f(m.entry(name.to_string()).or_default());
        }
    }

    async fn rescan(&self, rep: &Rep) -> anyhow::Result<()> {
        let started = Instant::now();
        if let Err(why) = self.check_marker(rep).await {
            let first = self
                .scan_state
                .lock()
                .map(|m| m.get(&rep.name).and_then(|s| s.refused.clone()) != Some(why.clone()))
                .unwrap_or(true);
            if first {
                tracing::error!(replicable = %rep.name, "{why}");
            }
            self.set_state(&rep.name, |s| s.refused = Some(why));
            return Ok(());
        }
        self.set_state(&rep.name, |s| {
            s.refused = None;
            s.running = true;
        });
        let name = rep.name.clone();
        let known = self
            .store
            .call(move |c| Ok(store::fingerprints(c, &name)?))
            .await?;
        let first_scan = known.is_empty();
        let (root, kind, patterns) = (rep.root.clone(), rep.kind, rep.patterns.clone());
        let walk = tokio::task::spawn_blocking(move || scan::walk(&root, kind, &patterns)).await?;
        let walk = match walk {
            Ok(w) => w,
            Err(e) => {
                let why = format!("cannot read {}: {e}; refusing to scan", rep.root.display());
                self.set_state(&rep.name, |s| {
                    s.refused = Some(why.clone());
                    s.running = false;
                });
                anyhow::bail!(why);
            }
        };
        let on_disk: HashSet<String> = walk.found.iter().map(|f| f.id.clone()).collect();
        let changed: Vec<scan::Found> = walk
            .found
            .into_iter()
            .filter(|f| known.get(&f.id) != Some(&f.fingerprint))
            .collect();
        let total = changed.len() as u64;
        let labels = rep_label(&rep.name);
        self.metrics
            .scan_total
            .get_or_create(&labels)
            .set(on_disk.len() as i64);
        self.metrics.scan_done.get_or_create(&labels).set(0);
        if first_scan && total > 0 {
            tracing::info!(replicable = %rep.name, items = total, "first scan: checksumming every item");
        }
        let mut done = 0u64;
        let mut failures = 0u64;
        let mut last_log = Instant::now();
        let mut batch: Vec<Upsert> = vec![];
        let mut in_flight: Option<tokio::task::JoinHandle<anyhow::Result<Vec<GeoEvent>>>> = None;
        let par = self.checksum_slots.available_permits().max(1) * 2;
        let items: Vec<(scan::Found, Expect)> = changed
            .into_iter()
            .map(|f| {
                let e = Expect::Fingerprint(known.get(&f.id).cloned());
                (f, e)
            })
            .collect();
        type Checked = (scan::Found, Expect, std::io::Result<(String, u64)>);
        let mut stream: futures::stream::BoxStream<'_, Checked> = match rep.kind {
            // Blobs: one blocking task per batch of files (small files are dominated by the
            // per-read hop to the blocking pool otherwise).
            DataType::Blob => {
                let mut chunks: Vec<Vec<(scan::Found, Expect)>> = vec![];
                let mut it = items.into_iter().peekable();
                while it.peek().is_some() {
                    chunks.push(it.by_ref().take(64).collect());
                }
                futures::stream::iter(chunks.into_iter().map(|chunk| {
                    let root = rep.root.clone();
                    let slots = self.checksum_slots.clone();
                    async move {
                        let _slot = slots.acquire_owned().await;
                        tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; 256 * 1024];
                            chunk
                                .into_iter()
                                .map(|(f, e)| {
                                    let r =
                                        scan::blob_checksum_blocking(&root.join(&f.id), &mut buf);
                                    (f, e, r)
                                })
                                .collect::<Vec<Checked>>()
                        })
                        .await
                        .unwrap_or_default()
                    }
                }))
                .buffer_unordered(par)
                .flat_map(futures::stream::iter)
                .boxed()
            }
            DataType::Repository => futures::stream::iter(items.into_iter().map(|(f, expect)| {
                let path = rep.root.join(&f.id);
                async move {
                    let r = self.checksum(rep, path).await;
                    (f, expect, r)
                }
            }))
            .buffer_unordered(par)
            .boxed(),
        };
        while let Some((f, expect, r)) = stream.next().await {
            done += 1;
            match r {
                Ok((checksum, size)) => batch.push(Upsert {
                    size: if rep.kind == DataType::Blob {
                        f.size
                    } else {
                        size
                    },
                    item_id: f.id,
                    checksum,
                    fingerprint: f.fingerprint,
                    expect,
                }),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(replicable = %rep.name, item = %f.id, "cannot checksum: {e}");
                    let (name, id, msg) = (rep.name.clone(), f.id.clone(), e.to_string());
                    let _ = self
                        .store
                        .call(move |c| Ok(store::record_verification_failure(c, &name, &id, &msg)?))
                        .await;
                }
            }
            if batch.len() >= 500 {
                // One commit in flight while hashing goes on; batches commit in order.
                if let Some(h) = in_flight.take() {
                    self.published(&join_commit(h).await?);
                }
                let (st, name, b) = (
                    self.store.clone(),
                    rep.name.clone(),
                    std::mem::take(&mut batch),
                );
                in_flight = Some(tokio::spawn(async move {
                    st.call(move |c| Ok(store::upsert_items(c, &name, &b)?.0))
                        .await
                }));
                self.metrics
                    .scan_done
                    .get_or_create(&labels)
                    .set(done as i64);
            }
            if last_log.elapsed() > Duration::from_secs(10) {
                last_log = Instant::now();
                tracing::info!(replicable = %rep.name, done, total, "scan progress");
                self.metrics
                    .scan_done
                    .get_or_create(&labels)
                    .set(done as i64);
            }
            if self.ctx.shutdown.is_cancelled() {
                break;
            }
        }
        drop(stream);
        if let Some(h) = in_flight.take() {
            self.published(&join_commit(h).await?);
        }
        self.commit_batch(rep, batch).await?;
        self.metrics
            .scan_done
            .get_or_create(&labels)
            .set(done as i64);

        // Deletes: catalogued items no longer on disk, through the guard.
        if !self.ctx.shutdown.is_cancelled() {
            let missing: Vec<(String, Expect)> = known
                .iter()
                .filter(|(id, _)| !on_disk.contains(*id))
                .map(|(id, fp)| (id.clone(), Expect::Fingerprint(Some(fp.clone()))))
                .collect();
            let missing_set: HashSet<String> = missing.iter().map(|m| m.0.clone()).collect();
            let (name, guard) = (rep.name.clone(), self.guard());
            let out = self
                .store
                .call(move |c| {
                    store::retain_paused(c, &name, &missing_set)?;
                    Ok(store::guarded_delete(c, &name, &missing, guard)?)
                })
                .await?;
            if let Some(w) = &out.paused {
                tracing::warn!(replicable = %rep.name, window = %w, "mass delete paused: confirm with POST /-/geo/confirm-deletes");
            }
            self.published(&out.events);
        }
        let secs = started.elapsed().as_secs_f64();
        if first_scan && total > 0 {
            tracing::info!(replicable = %rep.name, items = total, seconds = secs, "first scan done");
        }
        self.set_state(&rep.name, |s| {
            s.running = false;
            s.last_scan_at = Some(chrono::Utc::now());
            s.last_scan_seconds = Some(secs);
            s.found = on_disk.len() as u64;
            s.checksummed = done;
            s.skipped = walk.skipped;
            s.failures = failures;
        });
        Ok(())
    }

    async fn commit_batch(&self, rep: &Rep, batch: Vec<Upsert>) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let name = rep.name.clone();
        let (events, _conflicts) = self
            .store
            .call(move |c| Ok(store::upsert_items(c, &name, &batch)?))
            .await?;
        self.published(&events);
        Ok(())
    }

    /// Sites whose instances must acknowledge events before they are pruned: every other site
    /// with a trusted key (reporting sites are added by the store).
    fn known_sites(&self) -> Vec<String> {
        let own = self.ctx.site_id();
        let mut s: Vec<String> = self
            .ctx
            .keyring
            .sites()
            .filter(|s| *s != own)
            .map(str::to_string)
            .collect();
        s.sort();
        s.dedup();
        s
    }

    pub async fn prune(&self) -> anyhow::Result<i64> {
        let (sites, log_id) = (self.known_sites(), self.log_id.clone());
        let retention = self.ctx.config.geo.event_retention.as_millis() as i64;
        self.store
            .call(move |c| Ok(store::prune(c, &sites, &log_id, retention)?))
            .await
    }

    async fn prune_loop(self: Arc<Self>) {
        let every = (self.ctx.config.geo.event_retention / 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.prune().await {
                tracing::warn!("pruning the event log failed: {e:#}");
            }
        }
    }
}

async fn join_commit(
    h: tokio::task::JoinHandle<anyhow::Result<Vec<GeoEvent>>>,
) -> anyhow::Result<Vec<GeoEvent>> {
    h.await
        .map_err(|e| anyhow::anyhow!("catalog commit task failed: {e}"))?
}

pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

impl PushSink for Primary {
    /// Records the pushed repository's new state; resolves after the event is committed.
    /// A failure is logged and healed by the next rescan.
    fn push_completed(&self, push: CompletedPush) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(t) = self.mapper.map(&push.url_path) else {
                tracing::debug!(path = %push.url_path, "push to an unmapped repository: no event");
                return;
            };
            if let Err(e) = self.refresh_item(&t.replicable, &t.item_id).await {
                tracing::warn!(replicable = %t.replicable, item = %t.item_id, "recording the push failed (the next rescan records it): {e:#}");
            }
        })
    }
}
