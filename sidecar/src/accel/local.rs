//! Serving a fetch from the replica with `git upload-pack --stateless-rpc`.
//!
//! The wants were already checked against the tips the primary advertised to this client, so
//! `uploadpack.allowAnySHA1InWant` is safe here: a tip the primary advertises may not yet be a
//! ref tip in the replica (DESIGN §3). Concurrency is bounded by a semaphore; waiting requests
//! queue, and the queue is visible in metrics.

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

/// Limits concurrent local upload-packs.
pub struct UploadPackPool {
    permits: Arc<Semaphore>,
    /// Requests waiting for a slot (exported as `geo_accel_upload_pack_queued`).
    pub queued: Gauge,
    /// Local upload-packs running (exported as `geo_accel_upload_pack_running`).
    pub running: Gauge,
}

impl UploadPackPool {
    pub fn new(max: usize) -> Self {
        UploadPackPool {
            permits: Arc::new(Semaphore::new(max.max(1))),
            queued: Gauge::default(),
            running: Gauge::default(),
        }
    }

    /// Runs upload-pack over `repo` for `request`; returns the streaming response body and how
    /// long the request waited for a slot.
    pub async fn serve(
        &self,
        repo: &Path,
        request: Bytes,
        git_protocol: Option<&str>,
    ) -> std::io::Result<(Body, Duration)> {
        let start = Instant::now();
        self.queued.inc();
        let permit = self.permits.clone().acquire_owned().await;
        self.queued.dec();
        let permit = permit.map_err(|_| std::io::Error::other("upload-pack pool closed"))?;
        let waited = start.elapsed();

        let mut cmd = crate::git::command(repo);
        cmd.args([
            "-c",
            "uploadpack.allowAnySHA1InWant=true",
            "-c",
            "uploadpack.allowFilter=true",
            "upload-pack",
            "--stateless-rpc",
            ".",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if let Some(p) = git_protocol {
            cmd.env("GIT_PROTOCOL", p);
        }
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        // The request is small (bounded by the peek cap): write it, then close stdin.
        tokio::spawn(async move {
            let _ = stdin.write_all(&request).await;
            let _ = stdin.shutdown().await;
        });
        let running = self.running.clone();
        running.inc();
        let guard = RunGuard {
            _permit: permit,
            running,
            _child: child,
        };
        let stream =
            tokio_util::io::ReaderStream::with_capacity(stdout, 64 * 1024).map(move |chunk| {
                let _keep = &guard;
                chunk
            });
        Ok((Body::from_stream(stream), waited))
    }
}

struct RunGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    running: Gauge,
    /// Killed on drop (kill_on_drop) if the client goes away mid-stream.
    _child: tokio::process::Child,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.running.dec();
    }
}

/// Whether every object id exists in the replica (`git cat-file --batch-check`).
pub async fn has_objects(repo: &Path, oids: &[String]) -> bool {
    if oids.is_empty() || !repo.exists() {
        return oids.is_empty() && repo.exists();
    }
    let child = crate::git::command(repo)
        .args(["cat-file", "--batch-check=%(objectname)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = oids.iter().map(|o| format!("{o}\n")).collect::<String>();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });
    let Ok(out) = child.wait_with_output().await else {
        return false;
    };
    let _ = writer.await;
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .all(|l| !l.ends_with(" missing"))
        && String::from_utf8_lossy(&out.stdout).lines().count() == oids.len()
}
