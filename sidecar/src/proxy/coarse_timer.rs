//! Coarse per-thread deadlines for the request path's timeouts.
//!
//! Every proxied request arms two timeouts that almost never fire: hyper's wait for the client's
//! request head (`proxy.headerReadTimeout`, also the keep-alive idle limit) and our wait for
//! the upstream's response head. tokio's timer is exact and costs a clock read, a lock and a
//! timer-wheel insert and removal for each; counted with callgrind that was about 2,800
//! instructions, 6–7 % of a proxied request's user-space work (BENCHMARKS.md).
//!
//! Here an I/O thread keeps its deadlines in a slab, checked by one ticker task every
//! [`TICK`]: arming one is a slot in a vector, and its clock is the ticker's last reading. A
//! deadline therefore fires between one tick early and one tick late (the clock a deadline
//! starts from is up to a tick old). For timeouts of seconds that is immaterial.
//!
//! Only threads that run [`run_ticker`] (the service port's I/O threads, each a
//! single-threaded runtime whose tasks never move) use the slab; anywhere else a [`Deadline`]
//! is an ordinary tokio sleep. The ticker stops while no deadline is armed and restarts on
//! the next one, reading the clock afresh.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;

/// How often an I/O thread checks its deadlines.
pub const TICK: Duration = Duration::from_millis(100);

struct Entry {
    at: Instant,
    waker: Option<Waker>,
}

struct Wheel {
    /// Tells wheels apart (a deadline polled on a thread it was not armed on fires at once).
    id: u64,
    /// The ticker's last clock reading.
    now: Instant,
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    armed: usize,
    /// Set while the ticker waits for a first deadline.
    parked: Option<Waker>,
}

thread_local! {
    static WHEEL: RefCell<Option<Wheel>> = const { RefCell::new(None) };
}

static NEXT_WHEEL: AtomicU64 = AtomicU64::new(1);

/// Runs this thread's ticker; spawn it once on each I/O thread's runtime.
pub async fn run_ticker() {
    let id = NEXT_WHEEL.fetch_add(1, Ordering::Relaxed);
    WHEEL.set(Some(Wheel {
        id,
        now: Instant::now(),
        slots: Vec::new(),
        free: Vec::new(),
        armed: 0,
        parked: None,
    }));
    // the wheel goes with the ticker: deadlines armed later are tokio sleeps
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            let _ = WHEEL.try_with(|w| w.borrow_mut().take());
        }
    }
    let _unset = Unset;
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Nothing armed: wait for the first deadline instead of ticking.
        std::future::poll_fn(|cx| {
            with_wheel(|w| {
                if w.armed == 0 {
                    w.parked = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    w.parked = None;
                    Poll::Ready(())
                }
            })
            .unwrap_or(Poll::Ready(()))
        })
        .await;
        interval.tick().await;
        let due: Vec<Waker> = with_wheel(|w| {
            w.now = Instant::now();
            let now = w.now;
            w.slots
                .iter_mut()
                .flatten()
                .filter(|e| e.at <= now)
                .filter_map(|e| e.waker.take())
                .collect()
        })
        .unwrap_or_default();
        due.into_iter().for_each(Waker::wake);
    }
}

fn with_wheel<R>(f: impl FnOnce(&mut Wheel) -> R) -> Option<R> {
    WHEEL.with_borrow_mut(|w| w.as_mut().map(f))
}

/// The thread's coarse clock, fresh when its ticker was parked (see the module docs).
fn coarse_now(w: &mut Wheel) -> Instant {
    if w.parked.is_some() {
        w.now = Instant::now();
    }
    w.now
}

/// This thread's coarse clock on an I/O thread (up to a [`TICK`] old while deadlines are
/// armed, read afresh otherwise), the exact clock anywhere else: for bookkeeping that a tick
/// does not matter to, without a clock read per call.
pub fn now() -> std::time::Instant {
    with_wheel(coarse_now)
        .unwrap_or_else(Instant::now)
        .into_std()
}

/// Resolves once `at` has passed (coarsely on an I/O thread).
pub enum Deadline {
    Coarse {
        wheel: u64,
        slot: usize,
        at: Instant,
    },
    Exact(Pin<Box<tokio::time::Sleep>>),
}

impl Deadline {
    /// A deadline `after` from now.
    pub fn after(after: Duration) -> Deadline {
        with_wheel(|w| {
            let at = coarse_now(w) + after;
            arm(w, at)
        })
        .unwrap_or_else(|| Deadline::Exact(Box::pin(tokio::time::sleep(after))))
    }

    /// Sets `self` to `after` from now, keeping its slot (a deadline used again and again, as
    /// a connection's for each of its heads, costs an update rather than a slot each time).
    /// Until it is reset, a deadline that has passed stays due.
    pub fn reset(&mut self, after: Duration) {
        if let Deadline::Coarse { wheel, slot, at } = self {
            let done = with_wheel(|w| {
                let due = coarse_now(w) + after;
                match w.slots.get_mut(*slot) {
                    Some(Some(e)) if w.id == *wheel => {
                        e.at = due;
                        *at = due;
                        true
                    }
                    _ => false,
                }
            });
            if done == Some(true) {
                return;
            }
        }
        *self = Deadline::after(after);
    }

    /// `deadline` set to `after` from now: the one there reset, or else a new one.
    pub fn reset_or_arm(deadline: &mut Option<Deadline>, after: Duration) {
        match deadline {
            Some(d) => d.reset(after),
            None => *deadline = Some(Deadline::after(after)),
        }
    }

    /// A deadline at `at`.
    pub fn at(at: Instant) -> Deadline {
        with_wheel(|w| arm(w, at))
            .unwrap_or_else(|| Deadline::Exact(Box::pin(tokio::time::sleep_until(at))))
    }
}

fn arm(w: &mut Wheel, at: Instant) -> Deadline {
    let entry = Some(Entry { at, waker: None });
    let slot = match w.free.pop() {
        Some(i) => {
            w.slots[i] = entry;
            i
        }
        None => {
            w.slots.push(entry);
            w.slots.len() - 1
        }
    };
    w.armed += 1;
    if let Some(t) = w.parked.take() {
        t.wake();
    }
    Deadline::Coarse {
        wheel: w.id,
        slot,
        at,
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Deadline::Exact(s) => s.as_mut().poll(cx),
            Deadline::Coarse { wheel, slot, at } => with_wheel(|w| {
                if w.id != *wheel || w.now >= *at {
                    return Poll::Ready(());
                }
                if let Some(Some(e)) = w.slots.get_mut(*slot) {
                    match &e.waker {
                        Some(old) if old.will_wake(cx.waker()) => {}
                        _ => e.waker = Some(cx.waker().clone()),
                    }
                }
                Poll::Pending
            })
            // polled off its thread, or after the ticker ended: due now rather than never
            .unwrap_or(Poll::Ready(())),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Deadline::Coarse { wheel, slot, .. } = *self {
            let _ = WHEEL.try_with(|w| {
                if let Some(w) = w.borrow_mut().as_mut()
                    && w.id == wheel
                    && w.slots.get_mut(slot).and_then(Option::take).is_some()
                {
                    w.free.push(slot);
                    w.armed -= 1;
                }
            });
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

/// hyper's timer for the HTTP/1 server's head timeout (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::after(duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::at(Instant::from_std(deadline)))
    }

    fn now(&self) -> std::time::Instant {
        with_wheel(coarse_now)
            .unwrap_or_else(Instant::now)
            .into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn an_armed_deadline_fires_within_a_tick_of_its_time() {
        rt().block_on(async {
            tokio::spawn(run_ticker());
            tokio::task::yield_now().await;
            let start = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(60),
                Deadline::after(Duration::from_secs(5)),
            )
            .await
            .expect("the deadline fired");
            let took = start.elapsed();
            assert!(
                took >= Duration::from_secs(5) - TICK && took <= Duration::from_secs(5) + 2 * TICK,
                "fired after {took:?}"
            );
            with_wheel(|w| assert_eq!(w.armed, 0, "its slot was freed")).unwrap();
        });
    }

    #[test]
    fn a_dropped_deadline_frees_its_slot_for_the_next() {
        rt().block_on(async {
            tokio::spawn(run_ticker());
            tokio::task::yield_now().await;
            let a = Deadline::after(Duration::from_secs(1));
            let Deadline::Coarse { slot: sa, .. } = a else {
                panic!("an I/O thread's deadline is coarse")
            };
            drop(a);
            with_wheel(|w| assert_eq!(w.armed, 0)).unwrap();
            let b = Deadline::after(Duration::from_secs(1));
            let Deadline::Coarse { slot: sb, .. } = b else {
                panic!("coarse")
            };
            assert_eq!(sa, sb, "the slot is reused");
            // a short one fires while a long one stays armed
            let long = Deadline::after(Duration::from_secs(3600));
            tokio::time::timeout(Duration::from_secs(10), b)
                .await
                .expect("the short deadline fired");
            with_wheel(|w| assert_eq!(w.armed, 1, "only the long one is left")).unwrap();
            drop(long);
        });
    }

    #[test]
    fn a_reset_deadline_keeps_its_slot_and_fires_at_its_new_time() {
        rt().block_on(async {
            tokio::spawn(run_ticker());
            tokio::task::yield_now().await;
            let mut d = Deadline::after(Duration::from_secs(1));
            let Deadline::Coarse { slot: before, .. } = d else {
                panic!("coarse")
            };
            tokio::time::timeout(Duration::from_secs(10), &mut d)
                .await
                .expect("fired");
            // due now; reset, it waits again, in the same slot
            let start = Instant::now();
            d.reset(Duration::from_secs(5));
            let Deadline::Coarse { slot: after, .. } = d else {
                panic!("coarse")
            };
            assert_eq!(before, after);
            with_wheel(|w| assert_eq!(w.armed, 1)).unwrap();
            assert!(
                tokio::time::timeout(Duration::from_secs(4), &mut d)
                    .await
                    .is_err(),
                "not due before its new time"
            );
            tokio::time::timeout(Duration::from_secs(10), &mut d)
                .await
                .expect("fired at its new time");
            assert!(start.elapsed() >= Duration::from_secs(5) - TICK);
            drop(d);
            with_wheel(|w| assert_eq!(w.armed, 0)).unwrap();
        });
    }

    #[test]
    fn a_ticker_woken_after_idling_reads_the_clock_afresh() {
        rt().block_on(async {
            tokio::spawn(run_ticker());
            tokio::task::yield_now().await;
            // nothing armed for an hour: the ticker is parked and its clock stale
            tokio::time::advance(Duration::from_secs(3600)).await;
            let start = Instant::now();
            let timer = CoarseTimer;
            let at = hyper::rt::Timer::now(&timer) + Duration::from_secs(2);
            assert!(Instant::from_std(at) >= start + Duration::from_secs(2) - TICK);
            tokio::time::timeout(
                Duration::from_secs(60),
                hyper::rt::Timer::sleep_until(&timer, at),
            )
            .await
            .expect("the deadline fired");
            assert!(start.elapsed() >= Duration::from_secs(2) - TICK);
        });
    }

    #[test]
    fn off_an_io_thread_a_deadline_is_a_tokio_sleep() {
        rt().block_on(async {
            let d = Deadline::after(Duration::from_millis(300));
            assert!(matches!(d, Deadline::Exact(_)));
            let start = Instant::now();
            d.await;
            assert!(start.elapsed() >= Duration::from_millis(300));
        });
    }
}
