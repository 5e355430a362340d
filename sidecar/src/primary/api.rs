//! Geo API routes (DESIGN §4, §5) on the service port and the primary's admin routes.
//!
//! Every route authenticates with `Authorization: GL-Geo` for its scope (the hooks route with
//! the forge's hook token), answers JSON errors, and carries `Geo-Api-Version`. Item ids are
//! read from the raw request path and decoded exactly once. Syntax errors in the URL (400) are
//! reported before authentication (they reveal nothing about items); everything that depends
//! on the catalog or the disk comes after it.

// Handlers return ready responses as errors; boxing them buys nothing here.
#![allow(clippy::result_large_err)]

use super::store::{self, EventsRead};
use super::{Primary, Rep, ScanState, gitpack, scan};
use crate::http_util::{Resp, error, json, with_api_version};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::routing::{any, get, post};
use bytes::Bytes;
use geoforge_crds::auth::{AuthError, Scope, Verified};
use geoforge_crds::config::is_dns_label;
use geoforge_crds::replicable::DataType;
use geoforge_crds::wire::{
    CHECKSUM_HEADER, CatalogItem, CatalogPage, ChecksumConflict, DeletesPaused, ErrorBody,
    EventsGone, EventsPage, InstanceStatus, PlainHook, ReplicableReport, SiteStatus, SitesResponse,
    StatusReport,
};
use http::{HeaderMap, StatusCode, header};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

type P = State<Arc<Primary>>;

const MAX_JSON_BODY: usize = 1024 * 1024;

pub fn geo_routes(p: Arc<Primary>) -> Router {
    Router::new()
        .route("/api/v4/geo/replicables/{replicable}", get(catalog))
        .route("/api/v4/geo/events", get(events))
        .route("/api/v4/geo/retrieve/{*rest}", get(retrieve))
        .route("/api/v4/geo/repositories/{*rest}", any(repositories))
        .route("/api/v4/geo/status", post(report_status))
        .route("/api/v4/geo/sites", get(sites))
        .route("/api/v4/geo/hooks", post(hooks))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such Geo API route", true) })
        .layer(axum::middleware::map_response(|r: Resp| async move {
            with_api_version(r)
        }))
        .with_state(p)
}

pub fn admin_routes(p: Arc<Primary>) -> Router {
    Router::new()
        .route("/-/geo/status", get(admin_status))
        .route("/-/geo/confirm-deletes", post(confirm_deletes))
        .layer(axum::middleware::map_response(|r: Resp| async move {
            with_api_version(r)
        }))
        .with_state(p)
}

fn bad_request(msg: &str) -> Resp {
    error(StatusCode::BAD_REQUEST, msg, true)
}

fn coded(status: StatusCode, message: &str, code: &str) -> Resp {
    json(
        status,
        &ErrorBody {
            message: message.into(),
            geo_code: Some(code.into()),
        },
    )
}

fn internal(e: impl std::fmt::Display) -> Resp {
    tracing::error!("geo api: {e}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error (see the primary sidecar's log)",
        true,
    )
}

fn unauthorized(p: &Primary, route: &str, e: &AuthError) -> Resp {
    p.metrics
        .auth_failures
        .get_or_create(&vec![("route".to_string(), route.to_string())])
        .inc();
    tracing::debug!(route, "refused Geo API token: {e}");
    let mut r = error(StatusCode::UNAUTHORIZED, &e.to_string(), true);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("GL-Geo"),
    );
    r
}

/// Verifies the `Authorization` header for `scope`, audience this site.
fn authorize(
    p: &Primary,
    headers: &HeaderMap,
    scope: Scope,
    route: &str,
) -> Result<Verified, Resp> {
    let h = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    match p
        .ctx
        .keyring
        .verify_authorization(h, p.ctx.site_id(), scope)
    {
        Ok(v) => {
            tracing::debug!(route, kid = %v.kid, jti = %v.jti, "Geo API token accepted");
            Ok(v)
        }
        Err(e) => Err(unauthorized(p, route, &e)),
    }
}

/// The token's `data` must name this replicable (and item, when given).
fn check_data(
    p: &Primary,
    v: &Verified,
    route: &str,
    replicable: &str,
    id: Option<&str>,
) -> Result<(), Resp> {
    let ok = v.data.replicable.as_deref() == Some(replicable)
        && id.is_none_or(|id| v.data.id.as_deref() == Some(id));
    if ok {
        Ok(())
    } else {
        Err(unauthorized(p, route, &AuthError::WrongData))
    }
}

fn query(req: &Request) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn query_num<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    key: &str,
    default: T,
) -> Result<T, Resp> {
    match q.get(key) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| bad_request(&format!("query parameter {key} must be a number"))),
    }
}

/// Decodes an item id segment exactly once.
fn decode_id(seg: &str) -> Result<String, Resp> {
    let id = crate::items::decode_item_segment(seg).map_err(|e| bad_request(&e.to_string()))?;
    if scan::has_percent_escape(&id) {
        return Err(bad_request(
            "item id is encoded more than once (decoded exactly once, it still holds %XX)",
        ));
    }
    Ok(id)
}

/// Splits the raw path after `prefix` into `(replicable, item id, rest)`.
fn parse_item_path<'a>(raw: &'a str, prefix: &str) -> Result<(&'a str, String, &'a str), Resp> {
    let rest = raw
        .strip_prefix(prefix)
        .ok_or_else(|| bad_request("bad path"))?;
    let mut parts = rest.splitn(3, '/');
    let rep = parts.next().unwrap_or("");
    let seg = parts.next().unwrap_or("");
    let tail = parts.next().unwrap_or("");
    if !is_dns_label(rep) {
        return Err(bad_request("replicable must be a DNS label"));
    }
    if seg.is_empty() {
        return Err(bad_request(
            "item id missing (one path segment, '/' encoded as %2F)",
        ));
    }
    Ok((rep, decode_id(seg)?, tail))
}

fn known_rep<'a>(p: &'a Primary, name: &str) -> Result<&'a Rep, Resp> {
    p.rep(name).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            &format!("unknown replicable {name}"),
            true,
        )
    })
}

// ---- catalog ----

async fn catalog(State(p): P, req: Request) -> Resp {
    const ROUTE: &str = "replicables";
    let name = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    if !is_dns_label(&name) {
        return bad_request("replicable must be a DNS label");
    }
    let v = match authorize(&p, req.headers(), Scope::Catalog, ROUTE) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_data(&p, &v, ROUTE, &name, None) {
        return r;
    }
    if let Err(r) = known_rep(&p, &name) {
        return r;
    }
    let q = query(&req);
    let after: i64 = match q.get("after").filter(|s| !s.is_empty()) {
        None => 0,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => return bad_request("after must be a cursor returned by a previous page"),
        },
    };
    let limit: usize = match query_num(&q, "limit", 1000usize) {
        Ok(l) => l.clamp(1, 10_000),
        Err(r) => return r,
    };
    let n = name.clone();
    let r = p
        .store
        .call(move |c| Ok(store::catalog_page(c, &n, after, limit)?))
        .await;
    match r {
        Ok((rows, total)) => {
            let next_cursor = if rows.len() == limit {
                rows.last().map(|r| r.seq.to_string())
            } else {
                None
            };
            json(
                StatusCode::OK,
                &CatalogPage {
                    replicable: name,
                    items: rows
                        .into_iter()
                        .map(|r| CatalogItem {
                            id: r.item_id,
                            size: r.size,
                            checksum: r.checksum,
                            updated_at: r.updated_at,
                        })
                        .collect(),
                    next_cursor,
                    total,
                },
            )
        }
        Err(e) => internal(e),
    }
}

// ---- events ----

async fn events(State(p): P, req: Request) -> Resp {
    if let Err(r) = authorize(&p, req.headers(), Scope::Events, "events") {
        return r;
    }
    let q = query(&req);
    let after: i64 = match query_num(&q, "after", 0i64) {
        Ok(a) => a.max(0),
        Err(r) => return r,
    };
    let limit: usize = match query_num(&q, "limit", 500usize) {
        Ok(l) => l.clamp(1, 5000),
        Err(r) => return r,
    };
    let wait: f64 = match query_num(&q, "wait", 0f64) {
        Ok(w) if w.is_finite() => w.max(0.0),
        Ok(_) => return bad_request("wait must be a number of seconds"),
        Err(r) => return r,
    };
    let wait = Duration::from_secs_f64(wait.min(3600.0)).min(p.ctx.config.geo.max_long_poll);
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = p.head.subscribe();
    loop {
        rx.borrow_and_update();
        let r = p
            .store
            .call(move |c| Ok(store::read_events(c, after, limit)?))
            .await;
        match r {
            Err(e) => return internal(e),
            Ok(EventsRead::Gone {
                oldest_id,
                last_event_id,
            }) => {
                return json(
                    StatusCode::GONE,
                    &EventsGone {
                        log_id: p.log_id.clone(),
                        oldest_id,
                        last_event_id,
                    },
                );
            }
            Ok(EventsRead::Page {
                events,
                last_event_id,
            }) => {
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    return json(
                        StatusCode::OK,
                        &EventsPage {
                            log_id: p.log_id.clone(),
                            events,
                            last_event_id,
                        },
                    );
                }
            }
        }
        let _waiting = WaitingGuard::new(&p.metrics.long_polls);
        tokio::select! {
            r = rx.changed() => if r.is_err() { return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down", true) },
            _ = tokio::time::sleep_until(deadline) => {},
            _ = p.ctx.shutdown.cancelled() => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down", true),
        }
    }
}

/// Counts a parked long-poll while alive.
struct WaitingGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> WaitingGuard<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        WaitingGuard(g)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---- retrieve ----

async fn retrieve(State(p): P, req: Request) -> Resp {
    const ROUTE: &str = "retrieve";
    let raw = req.uri().path().to_string();
    let (name, id, tail) = match parse_item_path(&raw, "/api/v4/geo/retrieve/") {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !tail.is_empty() {
        return bad_request("item id must be one path segment ('/' encoded as %2F)");
    }
    let v = match authorize(&p, req.headers(), Scope::Retrieve, ROUTE) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_data(&p, &v, ROUTE, name, Some(&id)) {
        return r;
    }
    let Some(wanted) = v.data.checksum.clone().filter(|c| !c.is_empty()) else {
        return unauthorized(&p, ROUTE, &AuthError::WrongData);
    };
    let rep = match known_rep(&p, name) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if rep.kind != DataType::Blob {
        return bad_request("retrieve serves blobs; fetch repositories from /repositories/");
    }
    let path = match crate::items::resolve_under(&rep.root, &id) {
        Ok(p) => p,
        Err(e) => return bad_request(&e.to_string()),
    };
    for attempt in 0..2 {
        // Catalog row, open, stat and (for a small blob) the read: one blocking-pool hop.
        let (n, i, pth) = (name.to_string(), id.clone(), path.clone());
        let store = p.store.clone();
        let looked = tokio::task::spawn_blocking(move || lookup_blob(&store, &n, &i, &pth)).await;
        let (row, file, meta, data) = match looked {
            Ok(Ok(BlobLookup::Found {
                row,
                file,
                meta,
                data,
            })) => (row, file, meta, data),
            Ok(Ok(BlobLookup::NotInCatalog)) => {
                return coded(
                    StatusCode::NOT_FOUND,
                    "not in the catalog",
                    "NOT_IN_CATALOG",
                );
            }
            Ok(Ok(BlobLookup::FileNotFound)) => {
                return coded(StatusCode::NOT_FOUND, "file not found", "FILE_NOT_FOUND");
            }
            Ok(Err(e)) => return internal(e),
            Err(e) => return internal(format!("catalog task: {e}")),
        };
        if scan::blob_fingerprint(&meta) != row.fingerprint && attempt == 0 {
            // Changed on disk since it was catalogued: record the change first.
            if let Err(e) = p.refresh_item(name, &id).await {
                tracing::warn!(replicable = %name, "refreshing a changed item failed: {e:#}");
            }
            continue;
        }
        if row.checksum != wanted {
            return json(
                StatusCode::CONFLICT,
                &ChecksumConflict {
                    current_checksum: row.checksum,
                },
            );
        }
        return match data {
            Some(d) => http::Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, d.len())
                .header(CHECKSUM_HEADER, &row.checksum)
                .body(Body::from(d))
                .unwrap_or_else(internal),
            None => stream_file(file, meta.len(), &row.checksum),
        };
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "item is changing; retry",
        true,
    )
}

/// Files up to this size are read whole in the catalog lookup's hop (the small-blob backfill
/// is bound by per-item overheads); larger ones stream from a reader thread.
const INLINE_READ_MAX: u64 = 256 * 1024;

enum BlobLookup {
    NotInCatalog,
    FileNotFound,
    Found {
        row: store::ItemRow,
        file: std::fs::File,
        meta: Box<std::fs::Metadata>,
        /// The whole content, for a small file.
        data: Option<Bytes>,
    },
}

fn lookup_blob(
    store: &store::Store,
    name: &str,
    id: &str,
    path: &std::path::Path,
) -> anyhow::Result<BlobLookup> {
    use std::io::Read;
    let Some(row) = store.call_blocking(|c| Ok(store::get_item(c, name, id)?))? else {
        return Ok(BlobLookup::NotInCatalog);
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobLookup::FileNotFound),
        Err(e) => anyhow::bail!("open {}: {e}", path.display()),
    };
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        _ => return Ok(BlobLookup::FileNotFound),
    };
    let data = if meta.len() <= INLINE_READ_MAX {
        let mut buf = Vec::with_capacity(meta.len() as usize);
        (&mut file)
            .take(INLINE_READ_MAX + 1)
            .read_to_end(&mut buf)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        if buf.len() as u64 == meta.len() {
            Some(Bytes::from(buf))
        } else {
            // Changed between the stat and the read: stream instead, which fails the body
            // rather than send a length that does not match the bytes.
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| anyhow::anyhow!("seek {}: {e}", path.display()))?;
            None
        }
    } else {
        None
    };
    Ok(BlobLookup::Found {
        row,
        file,
        meta: Box::new(meta),
        data,
    })
}

/// Streams a file from a blocking reader thread in 2 MiB chunks (bounded queue: memory stays
/// flat however large the file).
fn stream_file(mut file: std::fs::File, len: u64, checksum: &str) -> Resp {
    const CHUNK: u64 = 2 << 20;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut left = len;
        while left > 0 {
            let n = CHUNK.min(left) as usize;
            // `read_to_end` into spare capacity: no zeroing of the chunk.
            let mut buf = Vec::with_capacity(n);
            match (&mut file).take(n as u64).read_to_end(&mut buf) {
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            if buf.is_empty() {
                // Truncated while streaming: fail the body rather than send short data.
                let _ = tx.blocking_send(Err(std::io::Error::other("file shrank while streaming")));
                return;
            }
            left -= buf.len() as u64;
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(CHECKSUM_HEADER, checksum)
        .body(Body::from_stream(stream))
        .unwrap_or_else(internal)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---- repositories ----

async fn repositories(State(p): P, req: Request) -> Resp {
    const ROUTE: &str = "repositories";
    let raw = req.uri().path().to_string();
    let (name, id, tail) = match parse_item_path(&raw, "/api/v4/geo/repositories/") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let q = query(&req);
    let service = q.get("service").map(String::as_str);
    if tail == "git-receive-pack" || service == Some("git-receive-pack") {
        return error(
            StatusCode::FORBIDDEN,
            "the Geo repository endpoint is read-only: receive-pack is refused",
            true,
        );
    }
    let method = req.method().clone();
    let advertise = match (tail, &method) {
        ("info/refs", &http::Method::GET) if service == Some("git-upload-pack") => true,
        ("info/refs", &http::Method::GET) => {
            return error(
                StatusCode::FORBIDDEN,
                "only smart HTTP with service=git-upload-pack is served",
                true,
            );
        }
        ("git-upload-pack", &http::Method::POST) => false,
        ("info/refs" | "git-upload-pack", _) => {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", true);
        }
        _ => return error(StatusCode::NOT_FOUND, "not a Git smart HTTP route", true),
    };
    let v = match authorize(&p, req.headers(), Scope::Repository, ROUTE) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = check_data(&p, &v, ROUTE, name, Some(&id)) {
        return r;
    }
    let rep = match known_rep(&p, name) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if rep.kind != DataType::Repository {
        return bad_request("not a repository replicable");
    }
    let path = match crate::items::resolve_under(&rep.root, &id) {
        Ok(p) => p,
        Err(e) => return bad_request(&e.to_string()),
    };
    let (n, i) = (name.to_string(), id.clone());
    match p.store.call(move |c| Ok(store::get_item(c, &n, &i)?)).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return coded(
                StatusCode::NOT_FOUND,
                "not in the catalog",
                "NOT_IN_CATALOG",
            );
        }
        Err(e) => return internal(e),
    }
    let pp = path.clone();
    if !tokio::task::spawn_blocking(move || scan::is_bare_repo(&pp))
        .await
        .unwrap_or(false)
    {
        return coded(
            StatusCode::NOT_FOUND,
            "repository not found",
            "FILE_NOT_FOUND",
        );
    }
    let proto = gitpack::git_protocol(req.headers());
    if advertise {
        gitpack::advertise(&path, proto).await
    } else {
        let (parts, body) = req.into_parts();
        gitpack::upload_pack(&path, proto, &parts.headers, body).await
    }
}

// ---- status and sites ----

#[derive(Serialize)]
struct Ack {
    log_id: String,
    last_event_id: i64,
    acknowledged: i64,
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Resp> {
    let b = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "body too large", true))?;
    serde_json::from_slice(&b).map_err(|e| {
        let msg = e.to_string();
        bad_request(&format!(
            "invalid JSON body: {}",
            msg.lines().next().unwrap_or("")
        ))
    })
}

async fn report_status(State(p): P, req: Request) -> Resp {
    let v = match authorize(&p, req.headers(), Scope::Status, "status") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let report: StatusReport = match read_json(req.into_body()).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if report.site != v.site {
        return error(
            StatusCode::FORBIDDEN,
            "a status report may only be sent for the site that signed the token",
            true,
        );
    }
    if report.instance.is_empty() || report.instance.len() > 253 {
        return bad_request("instance must be 1-253 characters");
    }
    let log_id = p.log_id.clone();
    let r2 = report.clone();
    let r = p
        .store
        .call(move |c| {
            store::store_report(c, &r2, &log_id)?;
            Ok(store::last_event_id(c)?)
        })
        .await;
    let last = match r {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    if let Err(e) = p.prune().await {
        tracing::warn!("pruning the event log failed: {e:#}");
    }
    let acknowledged = if report.log_id.as_deref() == Some(p.log_id.as_str()) {
        report.cursor
    } else {
        0
    };
    json(
        StatusCode::OK,
        &Ack {
            log_id: p.log_id.clone(),
            last_event_id: last,
            acknowledged,
        },
    )
}

async fn site_statuses(p: &Primary) -> anyhow::Result<Vec<SiteStatus>> {
    let rows = p.store.call(|c| store::instances(c)).await?;
    let now = store::now_ms();
    let mut sites: Vec<SiteStatus> = vec![];
    for r in rows {
        let inst = InstanceStatus {
            instance: r.instance,
            age_seconds: ((now - r.reported_at) / 1000).max(0),
            report: r.report,
        };
        match sites.iter_mut().find(|s| s.site == r.site) {
            Some(s) => s.instances.push(inst),
            None => sites.push(SiteStatus {
                site: r.site,
                instances: vec![inst],
            }),
        }
    }
    Ok(sites)
}

async fn sites(State(p): P, req: Request) -> Resp {
    if let Err(r) = authorize(&p, req.headers(), Scope::Sites, "sites") {
        return r;
    }
    match site_statuses(&p).await {
        Ok(sites) => json(StatusCode::OK, &SitesResponse { sites }),
        Err(e) => internal(e),
    }
}

// ---- hooks ----

fn hook_authorized(p: &Primary, headers: &HeaderMap) -> Result<(), Resp> {
    let Some(expected) = p.hook_token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "hooks are disabled: set forge.hookTokenFile",
            true,
        ));
    };
    let given = headers
        .get("x-gitlab-token")
        .map(|v| v.as_bytes())
        .unwrap_or(b"");
    // Hash both sides so the comparison is constant-time and length-independent.
    let g = super::sha256(given);
    let diff = g
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if given.is_empty() || diff != 0 {
        p.metrics
            .auth_failures
            .get_or_create(&vec![("route".to_string(), "hooks".to_string())])
            .inc();
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-Gitlab-Token",
            true,
        ));
    }
    Ok(())
}

/// Items a hook payload refers to: `(replicable, item id)`.
fn hook_targets(p: &Primary, v: &serde_json::Value) -> Result<Vec<(String, String)>, Resp> {
    let kind = v
        .get("event_name")
        .or_else(|| v.get("object_kind"))
        .and_then(|k| k.as_str());
    if let Some(kind) = kind {
        let s = |v: &serde_json::Value, ptr: &str| {
            v.pointer(ptr).and_then(|x| x.as_str()).map(str::to_string)
        };
        let paths: Vec<String> = match kind {
            "push" | "tag_push" | "repository_update" => {
                s(v, "/project/path_with_namespace").into_iter().collect()
            }
            "project_create" | "project_destroy" | "project_update" => {
                s(v, "/path_with_namespace").into_iter().collect()
            }
            "project_rename" | "project_transfer" => s(v, "/path_with_namespace")
                .into_iter()
                .chain(s(v, "/old_path_with_namespace"))
                .collect(),
            other => {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!(
                        "unsupported hook event {:?}: push, tag_push, repository_update, project_create, project_destroy, project_rename, project_transfer",
                        other.chars().take(64).collect::<String>()
                    ),
                    true,
                ));
            }
        };
        if paths.is_empty() {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "hook payload without path_with_namespace",
                true,
            ));
        }
        let mut out = vec![];
        for path in paths {
            for r in p
                .ctx
                .config
                .replicables
                .iter()
                .filter(|r| r.data_type == DataType::Repository)
            {
                let prefix = r
                    .url_mapping
                    .as_ref()
                    .map(|m| m.prefix.trim_end_matches('/').to_string())
                    .unwrap_or_default();
                let url = format!("{prefix}/{}.git", path.trim_matches('/'));
                if let Some(t) = p.mapper.map(&url)
                    && !out.contains(&(t.replicable.clone(), t.item_id.clone()))
                {
                    out.push((t.replicable, t.item_id));
                }
            }
        }
        return Ok(out);
    }
    let plain: PlainHook = serde_json::from_value(v.clone()).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "not a GitLab system hook nor {{event, replicable, id}}: {}",
                e.to_string().lines().next().unwrap_or("")
            ),
            true,
        )
    })?;
    if p.rep(&plain.replicable).is_none() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("unknown replicable {:?}", plain.replicable),
            true,
        ));
    }
    if !scan::servable_id(&plain.id) {
        return Err(bad_request("invalid item id"));
    }
    Ok(vec![(plain.replicable, plain.id)])
}

#[derive(Serialize)]
struct HookResult {
    events: Vec<i64>,
}

async fn hooks(State(p): P, req: Request) -> Resp {
    if let Err(r) = hook_authorized(&p, req.headers()) {
        return r;
    }
    let v: serde_json::Value = match read_json(req.into_body()).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let targets = match hook_targets(&p, &v) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut ids = vec![];
    for (rep, id) in targets {
        match p.refresh_item(&rep, &id).await {
            Ok(evs) => ids.extend(evs.iter().map(|e| e.id)),
            Err(e) => {
                tracing::info!(replicable = %rep, item = %id, "hook not recorded: {e:#}")
            }
        }
    }
    json(StatusCode::OK, &HookResult { events: ids })
}

// ---- admin ----

fn authorize_admin(p: &Primary, headers: &HeaderMap) -> Result<(), Resp> {
    let v = authorize(p, headers, Scope::Admin, "admin")?;
    if v.site != p.ctx.site_id() {
        // Admin tokens are signed with this site's own key (by its operator).
        return Err(unauthorized(p, "admin", &AuthError::UnknownKey));
    }
    Ok(())
}

#[derive(Serialize)]
struct CatalogStatus {
    replicable: String,
    #[serde(rename = "type")]
    data_type: &'static str,
    items: u64,
    root: String,
    scan: ScanState,
}

#[derive(Serialize)]
struct PrimaryStatus {
    #[serde(flatten)]
    report: StatusReport,
    pruned_through: i64,
    catalog: Vec<CatalogStatus>,
    sites: Vec<SiteStatus>,
}

async fn admin_status(State(p): P, req: Request) -> Resp {
    if let Err(r) = authorize_admin(&p, req.headers()) {
        return r;
    }
    let names: Vec<String> = p.reps.iter().map(|r| r.name.clone()).collect();
    let r = p
        .store
        .call(move |c| {
            let mut counts = vec![];
            for n in &names {
                counts.push(store::count_items(c, n)?);
            }
            Ok((
                counts,
                store::paused(c)?,
                store::last_event_id(c)?,
                store::pruned_through(c)?,
            ))
        })
        .await;
    let (counts, paused, last, pruned) = match r {
        Ok(x) => x,
        Err(e) => return internal(e),
    };
    let states = p.scan_state.lock().map(|m| m.clone()).unwrap_or_default();
    let mut reports = vec![];
    let mut catalog = vec![];
    let mut refused = vec![];
    for (rep, items) in p.reps.iter().zip(counts) {
        let st = states.get(&rep.name).cloned().unwrap_or_default();
        if let Some(why) = &st.refused {
            refused.push(format!("{}: {why}", rep.name));
        }
        let dp = paused.iter().find(|x| x.replicable == rep.name).map(|x| DeletesPaused {
            window_id: x.window_id.clone(),
            count: x.count,
            message: format!(
                "{} deletes of {} paused (more than max({}%, {}) in {}): confirm with POST /-/geo/confirm-deletes {{\"window_id\": \"{}\"}}",
                x.count,
                rep.name,
                p.ctx.config.geo.delete_percent,
                p.ctx.config.geo.delete_min,
                geoforge_crds::duration::format(p.ctx.config.geo.delete_window),
                x.window_id
            ),
        });
        reports.push(ReplicableReport {
            replicable: rep.name.clone(),
            total: items as i64,
            synced: items as i64,
            verified: items as i64 - st.failures as i64,
            verification_failed: st.failures as i64,
            deletes_paused: dp,
            ..Default::default()
        });
        catalog.push(CatalogStatus {
            replicable: rep.name.clone(),
            data_type: rep.kind.as_str(),
            items,
            root: rep.root.display().to_string(),
            scan: st,
        });
    }
    let sites = match site_statuses(&p).await {
        Ok(s) => s,
        Err(e) => return internal(e),
    };
    json(
        StatusCode::OK,
        &PrimaryStatus {
            report: StatusReport {
                site: p.ctx.site_id().to_string(),
                instance: p.ctx.instance.clone(),
                role: "primary".into(),
                version: crate::VERSION.into(),
                geo_api_version: geoforge_crds::GEO_API_VERSION.into(),
                log_id: Some(p.log_id.clone()),
                cursor: last,
                last_event_id: last,
                lag_seconds: 0,
                replicables: reports,
                lagging: vec![],
                paused: (!refused.is_empty()).then(|| refused.join("; ")),
                primary_url: None,
                reported_at: chrono::Utc::now(),
            },
            pruned_through: pruned,
            catalog,
            sites,
        },
    )
}

/// The body of `POST /-/geo/confirm-deletes`: the shared wire type (the operator relays the
/// `geoforge.dev/confirm-deletes` annotation with it); `replicable` is informational here,
/// since a window id names its pause.
type ConfirmBody = geoforge_crds::wire::ConfirmDeletes;

#[derive(Serialize)]
struct ConfirmResult {
    confirmed: usize,
    deleted: usize,
    events: Vec<i64>,
}

async fn confirm_deletes(State(p): P, req: Request) -> Resp {
    if let Err(r) = authorize_admin(&p, req.headers()) {
        return r;
    }
    let q = query(&req);
    let b = match axum::body::to_bytes(req.into_body(), MAX_JSON_BODY).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large", true),
    };
    let body: ConfirmBody = if b.iter().all(u8::is_ascii_whitespace) {
        ConfirmBody::default()
    } else {
        match serde_json::from_slice(&b) {
            Ok(c) => c,
            Err(_) => {
                return bad_request(
                    "body must be {\"window_id\": \"…\", \"replicable\": \"…\"} or empty",
                );
            }
        }
    };
    let window = body.window_id.or_else(|| q.get("window_id").cloned());
    let w = window.clone();
    let rows = match p
        .store
        .call(move |c| Ok(store::paused_items(c, w.as_deref())?))
        .await
    {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    if rows.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            &match window {
                Some(w) => format!("no paused deletes in window {w:?}"),
                None => "no paused deletes".into(),
            },
            true,
        );
    }
    // Re-check the disk: only items still missing are deleted.
    let mut checked = vec![];
    for (rep, id, _) in rows {
        let missing = match p.rep(&rep) {
            Some(r) => {
                let path = crate::items::resolve_under(&r.root, &id).ok();
                let kind = r.kind;
                tokio::task::spawn_blocking(move || {
                    path.is_none_or(|p| scan::stat_item(kind, &p).is_none())
                })
                .await
                .unwrap_or(false)
            }
            None => true,
        };
        checked.push((rep, id, missing));
    }
    let n = checked.len();
    let r = p
        .store
        .call(move |c| Ok(store::confirm_deletes(c, &checked)?))
        .await;
    match r {
        Ok(events) => {
            p.published(&events);
            p.refresh_gauges().await;
            tracing::info!(
                confirmed = n,
                deleted = events.len(),
                "paused deletes confirmed"
            );
            json(
                StatusCode::OK,
                &ConfirmResult {
                    confirmed: n,
                    deleted: events.len(),
                    events: events.iter().map(|e| e.id).collect(),
                },
            )
        }
        Err(e) => internal(e),
    }
}
