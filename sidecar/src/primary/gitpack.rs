//! `git upload-pack --stateless-rpc` over a catalogued repository, for `git fetch` by
//! secondaries. Every ref under `refs/` is served: the repository's own `hideRefs` are
//! overridden (replication needs the same refs the checksum counts, DESIGN §6).

use crate::http_util::{Resp, error};
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Largest (decompressed) upload-pack request accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

fn command(repo: &Path, git_protocol: Option<&str>) -> tokio::process::Command {
    let mut c = crate::git::command(repo);
    c.env("GIT_CONFIG_COUNT", "3")
        .env("GIT_CONFIG_KEY_1", "uploadpack.hideRefs")
        .env("GIT_CONFIG_VALUE_1", "!refs/")
        .env("GIT_CONFIG_KEY_2", "transfer.hideRefs")
        .env("GIT_CONFIG_VALUE_2", "!refs/")
        .env_remove("GIT_NAMESPACE")
        .env_remove("GIT_DIR");
    if let Some(p) = git_protocol {
        c.env("GIT_PROTOCOL", p);
    } else {
        c.env_remove("GIT_PROTOCOL");
    }
    c
}

/// The client's `Git-Protocol` header, if it only holds safe characters.
pub fn git_protocol(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("git-protocol")?.to_str().ok()?;
    (v.len() <= 256
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":=.,-_".contains(&b)))
    .then(|| v.to_string())
}

fn pkt_line(s: &str) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s.as_bytes());
    v
}

fn no_cache(b: http::response::Builder) -> http::response::Builder {
    b.header(
        header::CACHE_CONTROL,
        "no-cache, max-age=0, must-revalidate",
    )
    .header(header::PRAGMA, "no-cache")
}

/// `GET …/info/refs?service=git-upload-pack`.
pub async fn advertise(repo: &Path, git_protocol: Option<String>) -> Resp {
    let v2 = git_protocol
        .as_deref()
        .is_some_and(|p| p.split(':').any(|x| x == "version=2"));
    let out = command(repo, git_protocol.as_deref())
        .args(["upload-pack", "--stateless-rpc", "--advertise-refs", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await;
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            tracing::warn!(repo = %repo.display(), "git upload-pack --advertise-refs failed: {}", String::from_utf8_lossy(&o.stderr).trim());
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "git upload-pack failed",
                true,
            );
        }
        Err(e) => {
            tracing::warn!("cannot run git upload-pack: {e}");
            return error(StatusCode::SERVICE_UNAVAILABLE, "cannot run git", true);
        }
    };
    let mut body = vec![];
    if !v2 {
        body.extend(pkt_line("# service=git-upload-pack\n"));
        body.extend_from_slice(b"0000");
    }
    body.extend(out.stdout);
    no_cache(http::Response::builder())
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "application/x-git-upload-pack-advertisement",
        )
        .body(Body::from(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response", true))
}

/// `POST …/git-upload-pack`: the request body (gunzipped when needed) to upload-pack's
/// stdin, its stdout streamed back.
pub async fn upload_pack(
    repo: &Path,
    git_protocol: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Resp {
    let raw = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload-pack request too large or interrupted",
                true,
            );
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip"));
    let input: Bytes = if gzip {
        let r = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut out = vec![];
            flate2::read::GzDecoder::new(&raw[..])
                .take(MAX_REQUEST_BYTES as u64 + 1)
                .read_to_end(&mut out)
                .map(|_| out)
        })
        .await;
        match r {
            Ok(Ok(v)) if v.len() <= MAX_REQUEST_BYTES => v.into(),
            Ok(Ok(_)) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload-pack request too large",
                    true,
                );
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "request body is not valid gzip",
                    true,
                );
            }
        }
    } else {
        raw
    };
    let child = command(repo, git_protocol.as_deref())
        .args(["upload-pack", "--stateless-rpc", "."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot run git upload-pack: {e}");
            return error(StatusCode::SERVICE_UNAVAILABLE, "cannot run git", true);
        }
    };
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "git pipes", true);
    };
    tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        let _ = stdin.shutdown().await;
    });
    let repo_s = repo.display().to_string();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut err = String::new();
        let mut stderr = stderr;
        let _ = stderr.read_to_string(&mut err).await;
        match child.wait().await {
            Ok(st) if st.success() => {}
            Ok(st) => {
                tracing::debug!(repo = %repo_s, "git upload-pack exited with {st}: {}", err.trim())
            }
            Err(e) => tracing::debug!(repo = %repo_s, "git upload-pack: {e}"),
        }
    });
    let stream = tokio_util::io::ReaderStream::with_capacity(stdout, 64 * 1024);
    no_cache(http::Response::builder())
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-git-upload-pack-result")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response", true))
}
