//! Running `git http-backend` as a CGI script (RFC 3875): the request body is streamed to its
//! stdin, its stdout (CGI headers, then the body) streamed back; `Status:` is honoured.

use axum::body::Body;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Largest CGI header block accepted from the script.
const MAX_CGI_HEADERS: usize = 64 * 1024;

pub struct CgiParams<'a> {
    pub git: &'a str,
    pub root: &'a Path,
    /// Decoded, already checked not to leave the root.
    pub path_info: &'a str,
    pub query: &'a str,
    pub remote_addr: IpAddr,
    pub remote_user: Option<&'a str>,
}

/// Runs `git http-backend` for one request.
pub async fn run(p: CgiParams<'_>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let hv = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut cmd = tokio::process::Command::new(p.git);
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env(
            "SERVER_SOFTWARE",
            concat!("geo-sidecar/", env!("CARGO_PKG_VERSION")),
        )
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("GIT_PROJECT_ROOT", p.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", p.path_info)
        .env("QUERY_STRING", p.query)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("REMOTE_ADDR", p.remote_addr.to_string())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    if let Some(home) = std::env::var_os("HOME") {
        cmd.env("HOME", home);
    }
    if let Some(u) = p.remote_user {
        cmd.env("REMOTE_USER", u).env("AUTH_TYPE", "Basic");
    }
    if let Some(v) = hv("content-type") {
        cmd.env("CONTENT_TYPE", v);
    }
    if let Some(v) = hv("content-length") {
        cmd.env("CONTENT_LENGTH", v);
    }
    if let Some(v) = hv("git-protocol") {
        cmd.env("GIT_PROTOCOL", v);
    }
    if let Some(v) = hv("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = hv("accept") {
        cmd.env("HTTP_ACCEPT", v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot run `{} http-backend`: {e}", p.git);
            return crate::http_util::error(
                StatusCode::BAD_GATEWAY,
                "the Git backend could not be started",
                false,
            );
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");

    // Request body → stdin, streamed.
    tokio::spawn(async move {
        let mut body = body.into_data_stream();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) => {
                    if stdin.write_all(&b).await.is_err() {
                        break; // the script stopped reading (e.g. an error response)
                    }
                }
                Err(e) => {
                    tracing::debug!("client request body: {e}");
                    break;
                }
            }
        }
        let _ = stdin.shutdown().await;
    });
    // stderr → log; reap the child.
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line: String = line.chars().take(500).collect();
            tracing::warn!(target: "geo_sidecar::forge", "git http-backend: {line}");
        }
        match child.wait().await {
            Ok(st) if !st.success() => tracing::debug!("git http-backend exited with {st}"),
            Err(e) => tracing::warn!("git http-backend: {e}"),
            _ => {}
        }
    });

    let mut out = BufReader::with_capacity(64 * 1024, stdout);
    let mut resp = Response::builder();
    let mut status = StatusCode::OK;
    let mut total = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match out.read_until(b'\n', &mut line).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("git http-backend output: {e}");
                return bad_gateway();
            }
        };
        total += n;
        if n == 0 || total > MAX_CGI_HEADERS {
            tracing::warn!("git http-backend: no complete CGI header block");
            return bad_gateway();
        }
        let l = line.strip_suffix(b"\n").unwrap_or(&line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if l.is_empty() {
            break;
        }
        let Some(colon) = l.iter().position(|&b| b == b':') else {
            return bad_gateway();
        };
        let (name, value) = (&l[..colon], l[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"status") {
            let code = value
                .split(|&b| b == b' ')
                .next()
                .and_then(|c| std::str::from_utf8(c).ok())
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok());
            match code {
                Some(c) => status = c,
                None => return bad_gateway(),
            }
            continue;
        }
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            return bad_gateway();
        };
        resp = resp.header(name, value);
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(out, 64 * 1024);
    resp.status(status)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| bad_gateway())
}

fn bad_gateway() -> Response<Body> {
    crate::http_util::error(StatusCode::BAD_GATEWAY, "the Git backend failed", false)
}
