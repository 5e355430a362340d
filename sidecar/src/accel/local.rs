//! Serving a fetch from the replica with `git upload-pack --stateless-rpc`.
//!
//! The wants were already checked against the tips the primary advertised to this client, so
//! `uploadpack.allowAnySHA1InWant` is safe here: a tip the primary advertises may not yet be a
//! ref tip in the replica (DESIGN §3). Concurrency is bounded by a semaphore; waiting requests
//! queue, and the queue is visible in metrics.

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore};

/// Identical concurrent requests (same replica, protocol and request body: a clone storm of
/// one git version) share one upload-pack: followers replay the leader's output from its
/// start. Output is kept for followers up to this size; past it, a flight that nobody has
/// joined stops recording (and takes no new followers), so memory stays bounded.
const COALESCE_RECORD_CAP: usize = 64 * 1024 * 1024;

/// Limits concurrent local upload-packs and coalesces identical ones.
pub struct UploadPackPool {
    permits: Arc<Semaphore>,
    inflight: Arc<Mutex<HashMap<[u8; 32], Arc<Flight>>>>,
    /// Requests waiting for a slot (exported as `geo_accel_upload_pack_queued`).
    pub queued: Gauge,
    /// Local upload-packs running (exported as `geo_accel_upload_pack_running`).
    pub running: Gauge,
    /// Requests answered by joining an identical upload-pack in flight.
    pub coalesced: Counter,
}

struct Flight {
    state: Mutex<FlightState>,
    changed: Notify,
}

#[derive(Default)]
struct FlightState {
    chunks: Vec<Bytes>,
    recorded: usize,
    recording: bool,
    followers: usize,
    /// `Some(true)`: ended cleanly; `Some(false)`: failed.
    done: Option<bool>,
}

impl UploadPackPool {
    pub fn new(max: usize) -> Self {
        UploadPackPool {
            permits: Arc::new(Semaphore::new(max.max(1))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            queued: Gauge::default(),
            running: Gauge::default(),
            coalesced: Counter::default(),
        }
    }

    /// Runs upload-pack over `repo` for `request` (or joins an identical one in flight);
    /// returns the streaming response body and how long the request waited for a slot.
    pub async fn serve(
        &self,
        repo: &Path,
        request: Bytes,
        git_protocol: Option<&str>,
    ) -> std::io::Result<(Body, Duration)> {
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(repo.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            h.update(git_protocol.unwrap_or("").as_bytes());
            h.update(b"\0");
            h.update(&request);
            h.finalize().into()
        };
        let flight = {
            let mut map = self.inflight.lock().expect("inflight");
            if let Some(f) = map.get(&key) {
                let mut st = f.state.lock().expect("flight");
                // Join only while the whole output is still recorded.
                if st.recording {
                    st.followers += 1;
                    drop(st);
                    self.coalesced.inc();
                    return Ok((follow(f.clone()), Duration::ZERO));
                }
            }
            let f = Arc::new(Flight {
                state: Mutex::new(FlightState {
                    recording: true,
                    ..Default::default()
                }),
                changed: Notify::new(),
            });
            map.insert(key, f.clone());
            f
        };
        let leave = FlightEntry {
            map: self.inflight.clone(),
            key,
            flight: flight.clone(),
        };

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
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                leave.finish(false);
                return Err(e);
            }
        };
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
        // The pump feeds the leader's client through a bounded channel (back-pressure) and
        // records for followers. It stops early only when the leader's client is gone and
        // nobody follows (dropping the guard kills upload-pack).
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
        tokio::spawn(async move {
            let _guard = guard;
            let mut out = tokio_util::io::ReaderStream::with_capacity(stdout, 64 * 1024);
            let mut ok = true;
            let mut leader_gone = false;
            while let Some(chunk) = out.next().await {
                match chunk {
                    Ok(c) => {
                        let followers = leave.record(&c);
                        if !leader_gone && tx.send(Ok(c)).await.is_err() {
                            leader_gone = true;
                        }
                        if leader_gone && followers == 0 {
                            ok = false;
                            break;
                        }
                    }
                    Err(e) => {
                        ok = false;
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
            leave.finish(ok);
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok((Body::from_stream(stream), waited))
    }
}

/// A leader's hold on its flight: records output and removes the flight when it is over.
struct FlightEntry {
    map: Arc<Mutex<HashMap<[u8; 32], Arc<Flight>>>>,
    key: [u8; 32],
    flight: Arc<Flight>,
}

impl FlightEntry {
    /// Records a chunk for followers; returns how many follow.
    fn record(&self, chunk: &Bytes) -> usize {
        let mut st = self.flight.state.lock().expect("flight");
        let mut over_cap = false;
        if st.recording {
            st.chunks.push(chunk.clone());
            st.recorded += chunk.len();
            if st.recorded > COALESCE_RECORD_CAP {
                // No new followers past the cap; stop recording if nobody follows.
                over_cap = true;
                if st.followers == 0 {
                    st.recording = false;
                    st.chunks = Vec::new();
                }
            }
        }
        let n = st.followers;
        drop(st);
        // The map lock is taken after the flight lock is released (`serve` takes them in the
        // other order).
        if over_cap {
            self.unlist();
        }
        self.flight.changed.notify_waiters();
        n
    }

    fn finish(&self, ok: bool) {
        self.unlist();
        let mut st = self.flight.state.lock().expect("flight");
        st.done = Some(ok);
        st.recording = false;
        drop(st);
        self.flight.changed.notify_waiters();
    }

    fn unlist(&self) {
        let mut map = self.map.lock().expect("inflight");
        if map
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.key);
        }
    }
}

/// A follower's body: the flight's output from the start.
fn follow(flight: Arc<Flight>) -> Body {
    enum Step {
        Chunk(Bytes),
        End,
        Fail,
    }
    let stream = futures::stream::unfold(Some((flight, 0usize)), |st| async move {
        let (flight, i) = st?;
        let step = loop {
            let notified = flight.changed.notified();
            tokio::pin!(notified);
            // Register before looking, so a chunk recorded in between is not missed.
            notified.as_mut().enable();
            {
                let state = flight.state.lock().expect("flight");
                if let Some(c) = state.chunks.get(i) {
                    break Step::Chunk(c.clone());
                }
                match state.done {
                    Some(true) => break Step::End,
                    Some(false) => break Step::Fail,
                    None => {}
                }
            }
            notified.await;
        };
        match step {
            Step::Chunk(c) => Some((Ok::<_, std::io::Error>(c), Some((flight, i + 1)))),
            Step::End => None,
            Step::Fail => Some((Err(std::io::Error::other("upload-pack failed")), None)),
        }
    });
    Body::from_stream(stream)
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@e")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@e")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn pkt(s: &str) -> Vec<u8> {
        let mut v = format!("{:04x}", s.len() + 4).into_bytes();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[tokio::test]
    async fn identical_requests_share_one_upload_pack() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r");
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        // ~4 MiB of incompressible content: the pack is many chunks, so the leader's pump
        // blocks on its unread channel and the flight stays open for the second request.
        let mut data = vec![0u8; 4 * 1024 * 1024];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
        std::fs::write(repo.join("blob"), &data).unwrap();
        git(&repo, &["add", "blob"]);
        git(&repo, &["commit", "-q", "-m", "c"]);
        let tip = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
        let mut req = pkt(&format!("want {tip} side-band-64k ofs-delta\n"));
        req.extend_from_slice(b"0000");
        req.extend_from_slice(&pkt("done\n"));
        let req = Bytes::from(req);

        let pool = UploadPackPool::new(4);
        let (a, _) = pool.serve(&repo, req.clone(), None).await.unwrap();
        let (b, _) = pool.serve(&repo, req.clone(), None).await.unwrap();
        assert_eq!(
            pool.coalesced.get(),
            1,
            "the second request joined the first"
        );
        let (a, b) = tokio::join!(a.collect(), b.collect());
        let (a, b) = (a.unwrap().to_bytes(), b.unwrap().to_bytes());
        assert!(a.len() > 4 * 1024 * 1024, "a whole pack: {} bytes", a.len());
        assert!(
            a == b,
            "the follower got the leader's output from its start"
        );
        // Once the flight is over, the same request runs again on its own.
        let (c, _) = pool.serve(&repo, req, None).await.unwrap();
        let c = c.collect().await.unwrap().to_bytes();
        // (Progress lines differ between runs; the pack is there again, whole.)
        assert!(
            c.len() > 4 * 1024 * 1024 && c.ends_with(b"0000"),
            "{} bytes",
            c.len()
        );
        assert_eq!(pool.coalesced.get(), 1);
        assert_eq!(pool.running.get(), 0);
    }
}
