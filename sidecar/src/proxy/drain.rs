//! Graceful drain of an I/O thread's connections on shutdown.
//!
//! When the drain starts, every connection is asked to finish what it is doing and close
//! (HTTP/1.1: after the response in flight; HTTP/2: GOAWAY), and [`Drain::drained`] resolves
//! once the last one has ended. hyper-util's `GracefulShutdown` does the same by polling a
//! tokio `watch` receiver with every poll of every connection, which takes the channel's
//! waiter lock each time (about 470 instructions per proxied request, BENCHMARKS.md). Here a
//! poll costs one flag load and one `AtomicWaker` registration; the drain wakes the
//! connections it needs.

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use tokio::sync::Notify;

/// A connection that can be asked to close once its work in flight is done.
pub trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: hyper_util::server::graceful::GracefulConnection> Graceful for C {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::graceful::GracefulConnection::graceful_shutdown(self)
    }
}

/// One I/O thread's connections, for the drain.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    /// Connections to wake when the drain starts (dead ones are pruned as new ones come).
    wakers: Mutex<Vec<Weak<AtomicWaker>>>,
    open: AtomicUsize,
    ended: Notify,
}

impl Drain {
    pub fn new() -> Arc<Drain> {
        Arc::new(Drain::default())
    }

    /// Watches `conn`: it is asked to shut down gracefully when the drain starts.
    pub fn watch<C: Graceful>(self: &Arc<Self>, conn: C) -> Watched<C> {
        let waker = Arc::new(AtomicWaker::new());
        {
            let mut wakers = self.wakers.lock().expect("drain wakers");
            if wakers.len() >= 64 && wakers.len() >= 2 * self.open.load(Ordering::Relaxed) {
                wakers.retain(|w| w.strong_count() > 0);
            }
            wakers.push(Arc::downgrade(&waker));
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Watched {
            conn: Box::pin(conn),
            waker,
            drain: self.clone(),
            asked: false,
        }
    }

    /// The drain has begun (a connection that reads this itself needs no asking).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Connections not yet ended.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Starts the drain (every watched connection, and any watched later, is asked to close)
    /// and resolves when none is left.
    pub async fn drained(&self) {
        self.draining.store(true, Ordering::Release);
        let wakers: Vec<_> = self
            .wakers
            .lock()
            .expect("drain wakers")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        wakers.iter().for_each(|w| w.wake());
        loop {
            let ended = self.ended.notified();
            if self.open() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// A connection under a [`Drain`].
pub struct Watched<C: Graceful> {
    conn: Pin<Box<C>>,
    waker: Arc<AtomicWaker>,
    drain: Arc<Drain>,
    asked: bool,
}

impl<C: Graceful> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.asked {
            // registered before the flag is read: a drain starting in between still wakes us
            this.waker.register(cx.waker());
            if this.drain.is_draining() {
                this.asked = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C: Graceful> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.drain.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connection that runs until asked to shut down, then ends after one more poll.
    struct Fake {
        asked: bool,
    }

    impl Future for Fake {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.asked {
                Poll::Ready(())
            } else {
                let _ = cx;
                Poll::Pending
            }
        }
    }

    impl Graceful for Fake {
        fn graceful_shutdown(mut self: Pin<&mut Self>) {
            self.asked = true;
        }
    }

    #[tokio::test]
    async fn idle_connections_are_woken_asked_to_close_and_waited_for() {
        let drain = Drain::new();
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(drain.watch(Fake { asked: false })))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(drain.open(), 3);
        tokio::time::timeout(Duration::from_secs(10), drain.drained())
            .await
            .expect("all three connections ended within 10 s");
        assert_eq!(drain.open(), 0);
        for t in tasks {
            t.await.unwrap();
        }
        // a connection watched after the drain began is asked at its first poll
        let late = drain.watch(Fake { asked: false });
        tokio::time::timeout(Duration::from_secs(10), late)
            .await
            .expect("the late connection was asked to close");
    }

    #[tokio::test]
    async fn without_a_drain_a_connection_is_left_alone() {
        let drain = Drain::new();
        let conn = drain.watch(Fake { asked: false });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), conn)
                .await
                .is_err(),
            "nobody asked it to close"
        );
        assert_eq!(drain.open(), 0, "dropping it counted it as ended");
    }
}
