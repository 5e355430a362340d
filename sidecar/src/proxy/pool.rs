//! Idle upstream connections, one list per thread, upstream and origin.
//!
//! A connection enters the list when the response it carried has been read to the end
//! ([`crate::proxy::h1::ResponseBody`]) and leaves it for the next request to the same
//! origin, most recently used first (the warmest socket, and the oldest ones age out).
//! Connections idle longer than `proxy.poolIdleTimeout` are closed when the list is next
//! touched on that thread, and never handed out; one that the upstream closed (or that
//! received anything while idle) is closed when it is next taken. An idle connection is
//! never reused after the timeout, which stays below the upstream's keep-alive so that we,
//! not the upstream, close first.

use crate::proxy::coarse_timer;
use crate::proxy::h1::Conn;
use http::Uri;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Idle connections kept per upstream origin and thread.
const MAX_IDLE: usize = 256;

struct Idle {
    conn: Conn,
    since: Instant,
}

struct List {
    upstream: u64,
    origin: OriginKey,
    idle: Vec<Idle>,
}

thread_local! {
    static LISTS: RefCell<Vec<List>> = const { RefCell::new(Vec::new()) };
}

/// An origin (`scheme://authority`) as a number, the same for the same origin: lists are
/// told apart by comparing two numbers, not two URIs, and a connection's way back to its
/// list is a number, not a URI to clone per request. Origins come from
/// [`crate::proxy::upstream::UpstreamBase`], normalised by the URL parser, and are compared
/// byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginKey(u64);

impl OriginKey {
    /// The key of `origin` (looked up once per upstream base, not per request).
    pub fn of(origin: &Uri) -> OriginKey {
        // every origin ever proxied to: a few, growing only when configured URLs change
        static ORIGINS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let s = format!(
            "{}://{}",
            origin.scheme_str().unwrap_or(""),
            origin.authority().map_or("", |a| a.as_str())
        );
        let mut known = ORIGINS.lock().unwrap_or_else(|e| e.into_inner());
        let i = match known.iter().position(|k| *k == s) {
            Some(i) => i,
            None => {
                known.push(s);
                known.len() - 1
            }
        };
        OriginKey(i as u64)
    }
}

fn with_list<R>(upstream: u64, origin: OriginKey, f: impl FnOnce(&mut Vec<Idle>) -> R) -> R {
    LISTS.with_borrow_mut(|lists| {
        let i = match lists
            .iter()
            .position(|l| l.upstream == upstream && l.origin == origin)
        {
            Some(i) => i,
            None => {
                lists.push(List {
                    upstream,
                    origin,
                    idle: Vec::new(),
                });
                lists.len() - 1
            }
        };
        f(&mut lists[i].idle)
    })
}

/// The most recently used open idle connection to `origin`, if any.
pub fn take(upstream: u64, origin: OriginKey, idle_timeout: Duration) -> Option<Conn> {
    with_list(upstream, origin, |idle| {
        // the coarse clock is up to a tick old: nothing next to an idle limit of seconds
        let now = coarse_timer::now();
        while let Some(mut i) = idle.pop() {
            if now.duration_since(i.since) < idle_timeout && i.conn.is_idle_open() {
                return Some(i.conn);
            }
            // closed, spoken to while idle, or expired: dropped, which closes it
        }
        None
    })
}

/// Where a connection goes back once its response has been read.
pub struct Checkin {
    upstream: u64,
    origin: OriginKey,
    idle_timeout: Duration,
}

impl Checkin {
    pub fn new(upstream: u64, origin: OriginKey, idle_timeout: Duration) -> Checkin {
        Checkin {
            upstream,
            origin,
            idle_timeout,
        }
    }

    /// Checks in as idle since `at`, which is also "now" for dropping expired neighbours.
    fn put_at(self, conn: Conn, at: Instant) {
        let Checkin {
            upstream,
            origin,
            idle_timeout,
        } = self;
        with_list(upstream, origin, |idle| {
            // the oldest are first: drop the expired ones while the list is at hand
            let expired = idle
                .iter()
                .take_while(|i| at.saturating_duration_since(i.since) >= idle_timeout)
                .count();
            idle.drain(..expired);
            if idle.len() >= MAX_IDLE {
                idle.remove(0);
            }
            idle.push(Idle { conn, since: at });
        });
    }
}

impl crate::proxy::h1::Checkin for Checkin {
    fn put(self, conn: Conn) {
        // the I/O thread's coarse clock: the idle limit is seconds, a tick is 100 ms
        self.put_at(conn, coarse_timer::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::Checkin as _;
    use tokio::io::AsyncReadExt;

    /// A loopback server that reports when the client closed its connection, and a
    /// connection to it.
    async fn connection() -> (OriginKey, Conn, tokio::sync::oneshot::Receiver<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", l.local_addr().unwrap())
            .parse()
            .unwrap();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 64];
            while s.read(&mut b).await.is_ok_and(|n| n > 0) {}
            let _ = closed_tx.send(());
        });
        let io = tokio::net::TcpStream::connect(origin.authority().unwrap().as_str())
            .await
            .unwrap();
        (OriginKey::of(&origin), Conn::new(Box::new(io)), closed)
    }

    const IDLE: Duration = Duration::from_secs(20);

    #[test]
    fn origins_have_one_key_each() {
        let key = |s: &str| OriginKey::of(&s.parse().unwrap());
        assert_eq!(
            key("http://a.example:8080/"),
            key("http://a.example:8080/x")
        );
        assert_ne!(
            key("http://a.example:8080/"),
            key("https://a.example:8080/")
        );
        assert_ne!(key("http://a.example:8080/"), key("http://a.example:8081/"));
        assert_ne!(key("http://a.example/"), key("http://b.example/"));
    }

    #[tokio::test]
    async fn a_checked_in_connection_is_handed_out_once() {
        let (origin, conn, _closed) = connection().await;
        Checkin::new(1, origin, IDLE).put(conn);
        assert!(take(1, origin, IDLE).is_some());
        assert!(take(1, origin, IDLE).is_none(), "taken already");
    }

    #[tokio::test]
    async fn an_expired_connection_is_closed_not_reused() {
        let (origin, conn, closed) = connection().await;
        let long_ago = Instant::now()
            .checked_sub(IDLE * 2)
            .expect("the clock started long ago");
        Checkin::new(7, origin, IDLE).put_at(conn, long_ago);
        assert!(take(7, origin, IDLE).is_none());
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the upstream saw the expired connection close within 10 s")
            .unwrap();
    }

    #[tokio::test]
    async fn connections_of_other_upstreams_or_origins_are_not_mixed() {
        let (origin, conn, _closed) = connection().await;
        Checkin::new(3, origin, IDLE).put(conn);
        let other = OriginKey::of(&"http://127.0.0.1:1/".parse().unwrap());
        assert!(take(4, origin, IDLE).is_none(), "another upstream's list");
        assert!(take(3, other, IDLE).is_none(), "another origin");
        assert!(take(3, origin, IDLE).is_some());
    }
}
