//! Git LFS downloads from the replica (DESIGN §3).
//!
//! The batch request is always proxied (the primary authorizes it). In its answer, download
//! actions of objects that are synced here (oid → item id through a blob replicable's
//! `idTemplate`) are pointed at this secondary: `/-/geo/lfs/<replicable>/<oid>?token=<JWT>`,
//! a short-lived token signed with this site's key and bound to that replicable and oid.
//! Uploads and everything else stay with the primary.

use crate::http_util::Resp;
use crate::items::expand_id_template;
use axum::body::Body;
use geoforge_crds::auth::{KeyRing, Scope, SigningKey, TokenData};
use geoforge_crds::config::SidecarConfig;
use geoforge_crds::replicable::DataType;
use http::{HeaderMap, StatusCode, header};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Route prefix of local LFS downloads.
pub const DOWNLOAD_PREFIX: &str = "/-/geo/lfs/";
/// Validity of a download link.
pub const LINK_VALIDITY: Duration = Duration::from_secs(60);

/// Blob replicables that LFS oids map into.
pub fn lfs_replicables(config: &SidecarConfig) -> Vec<(String, String)> {
    config
        .replicables
        .iter()
        .filter(|r| r.data_type == DataType::Blob)
        .filter_map(|r| r.id_template.clone().map(|t| (r.name.clone(), t)))
        .collect()
}

/// The download actions of a batch response that could be served here: `(index, oid)`.
pub fn download_oids(batch: &Value) -> Vec<(usize, String)> {
    let Some(objects) = batch.get("objects").and_then(Value::as_array) else {
        return vec![];
    };
    objects
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            let oid = o.get("oid")?.as_str()?;
            o.get("actions")?.get("download")?;
            Some((i, oid.to_string()))
        })
        .collect()
}

/// Points object `index`'s download action at `href` (dropping the primary's auth headers).
pub fn point_download_at(batch: &mut Value, index: usize, href: String) {
    if let Some(dl) = batch
        .get_mut("objects")
        .and_then(|o| o.get_mut(index))
        .and_then(|o| o.get_mut("actions"))
        .and_then(|a| a.get_mut("download"))
    {
        dl["href"] = Value::String(href);
        if let Some(obj) = dl.as_object_mut() {
            obj.remove("header");
            obj.insert("expires_in".into(), Value::from(LINK_VALIDITY.as_secs()));
            obj.remove("expires_at");
        }
    }
}

/// A signed link for one object.
pub fn link(config: &SidecarConfig, key: &SigningKey, replicable: &str, oid: &str) -> String {
    let token = key.mint(
        &config.site_id,
        &TokenData::retrieve(replicable, oid, "lfs"),
        LINK_VALIDITY,
    );
    format!(
        "{}{DOWNLOAD_PREFIX}{replicable}/{oid}?token={token}",
        config.external_url.trim_end_matches('/')
    )
}

/// Checks a download link's token; returns `(replicable, oid)`.
pub fn verify_link(
    config: &SidecarConfig,
    keyring: &KeyRing,
    path: &str,
    query: &str,
) -> Result<(String, String), &'static str> {
    let rest = path
        .strip_prefix(DOWNLOAD_PREFIX)
        .ok_or("not an LFS link")?;
    let (replicable, oid) = rest.split_once('/').ok_or("malformed LFS link")?;
    let token = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .ok_or("missing token")?;
    let value = format!("{}:{token}", config.keys.kid);
    let v = keyring
        .verify_token(&value, &config.site_id, Scope::Retrieve)
        .map_err(|_| "invalid or expired link")?;
    if v.site != config.site_id
        || v.data.replicable.as_deref() != Some(replicable)
        || v.data.id.as_deref() != Some(oid)
    {
        return Err("invalid or expired link");
    }
    Ok((replicable.to_string(), oid.to_string()))
}

/// Maps an oid to its item id in `replicable`.
pub fn item_for(config: &SidecarConfig, replicable: &str, oid: &str) -> Option<String> {
    let r = config.replicables.iter().find(|r| r.name == replicable)?;
    expand_id_template(r.id_template.as_deref()?, oid)
}

/// Serves a file with `Content-Length` and single-range support.
pub async fn serve_file(path: PathBuf, headers: &HeaderMap) -> Resp {
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true),
    };
    let len = match f.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true),
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(None) => {
            return http::Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .expect("static response");
        }
    };
    if start > 0 && f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return crate::http_util::error(StatusCode::NOT_FOUND, "object not found", true);
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        f.take(end - start),
        256 * 1024,
    ));
    let mut b = http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    b.body(body).expect("static response")
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` → half-open `[start, end)`; `None` if unsatisfiable.
pub fn parse_range(r: &str, len: u64) -> Option<(u64, u64)> {
    let spec = r.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len)
        }
        (s, "") => (s.parse().ok()?, len),
        (s, e) => (
            s.parse().ok()?,
            e.parse::<u64>().ok()?.saturating_add(1).min(len),
        ),
    };
    (start < end && start < len).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 100)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    #[test]
    fn batch_rewrite() {
        let oid = "a".repeat(64);
        let mut v: Value = serde_json::json!({"transfer": "basic", "objects": [
            {"oid": oid, "size": 3, "actions": {"download": {"href": "https://primary/x", "header": {"Authorization": "secret"}}}},
            {"oid": "b".repeat(64), "size": 3, "actions": {"upload": {"href": "https://primary/y"}}}
        ]});
        assert_eq!(download_oids(&v), vec![(0, oid.clone())]);
        point_download_at(&mut v, 0, "https://secondary/z".into());
        assert_eq!(
            v["objects"][0]["actions"]["download"]["href"],
            "https://secondary/z"
        );
        assert!(
            v["objects"][0]["actions"]["download"]
                .get("header")
                .is_none()
        );
        assert_eq!(
            v["objects"][1]["actions"]["upload"]["href"],
            "https://primary/y"
        );
    }
}
