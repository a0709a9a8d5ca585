//! What a sink appended itself, shared (on one worker) between its
//! `append` operator and the `descs` operator of its read-back source.
//!
//! A sink reads its shard back to learn what the shard holds. For the
//! intervals `[lower, upper)` its own `compare_and_append` filled, it need
//! not fetch anything: the shard holds exactly the batches its `write`
//! operators wrote there. The read-back source skips fetching such a
//! listen step and sends the appends it covers to the `write` operators
//! instead, in order with the data it does read.
//!
//! Both operators run on the same worker (thread), so the record is an
//! `Rc<RefCell<..>>`; a [`Notify`] wakes a source that waits for the outcome
//! of an append in flight.

use std::cell::RefCell;
use std::fmt::Debug;
use std::rc::Rc;

use timely::PartialOrder;
use timely::progress::{Antichain, Timestamp};
use tokio::sync::Notify;

/// The bounds `[lower, upper)` of one of the sink's own appends.
pub(crate) type Bounds<T> = (Antichain<T>, Antichain<T>);

#[derive(Debug)]
struct Inner<T> {
    /// The bounds of the append in flight, if any.
    pending: Option<Bounds<T>>,
    /// The sink's own successful appends, in increasing order.
    appended: Vec<Bounds<T>>,
}

/// The record of a sink's own successful appends (clones share it).
#[derive(Debug)]
pub(crate) struct OwnAppends<T> {
    inner: Rc<RefCell<Inner<T>>>,
    notify: Rc<Notify>,
}

impl<T> Clone for OwnAppends<T> {
    fn clone(&self) -> Self {
        OwnAppends {
            inner: Rc::clone(&self.inner),
            notify: Rc::clone(&self.notify),
        }
    }
}

/// Clears the in-flight mark when dropped: an append that failed, or was
/// cancelled half way (its operator shut down), leaves no reader waiting.
#[derive(Debug)]
pub(crate) struct PendingAppend<T: Timestamp> {
    own: OwnAppends<T>,
}

impl<T: Timestamp> Drop for PendingAppend<T> {
    fn drop(&mut self) {
        self.own.inner.borrow_mut().pending = None;
        self.own.notify.notify_waiters();
    }
}

impl<T: Timestamp> OwnAppends<T> {
    pub(crate) fn new() -> Self {
        OwnAppends {
            inner: Rc::new(RefCell::new(Inner {
                pending: None,
                appended: Vec::new(),
            })),
            notify: Rc::new(Notify::new()),
        }
    }

    /// Marks an append of `[lower, upper)` as in flight until the returned
    /// guard is dropped; readers asking about an overlapping interval wait
    /// for the guard to go (after [`OwnAppends::record`] if it succeeded).
    pub(crate) fn start(&self, lower: &Antichain<T>, upper: &Antichain<T>) -> PendingAppend<T> {
        self.inner.borrow_mut().pending = Some((lower.clone(), upper.clone()));
        PendingAppend { own: self.clone() }
    }

    /// Records that the sink's own append filled `[lower, upper)`.
    pub(crate) fn record(&self, lower: &Antichain<T>, upper: &Antichain<T>) {
        self.inner
            .borrow_mut()
            .appended
            .push((lower.clone(), upper.clone()));
    }

    /// If the sink's own appends filled all of `[lower, upper)`, those
    /// appends (each overlapping it), in order. If an append that may fill
    /// part of it is in flight, waits for its outcome first. Forgets appends
    /// that end at or before `lower` (readers ask in increasing order).
    pub(crate) async fn covering(
        &self,
        lower: &Antichain<T>,
        upper: &Antichain<T>,
    ) -> Option<Vec<Bounds<T>>> {
        self.covering_until(lower, |covered| PartialOrder::less_equal(upper, covered))
            .await
    }

    /// Like [`OwnAppends::covering`] for every time from `lower` through
    /// `through` inclusive (a snapshot at `through`).
    pub(crate) async fn covering_through(
        &self,
        lower: &Antichain<T>,
        through: &Antichain<T>,
    ) -> Option<Vec<Bounds<T>>> {
        self.covering_until(lower, |covered| PartialOrder::less_than(through, covered))
            .await
    }

    /// The appends from `lower` on, if they cover it without a gap until
    /// `done(covered)`; an append in flight that starts where `done` does
    /// not yet hold is waited for.
    async fn covering_until(
        &self,
        lower: &Antichain<T>,
        done: impl Fn(&Antichain<T>) -> bool,
    ) -> Option<Vec<Bounds<T>>> {
        loop {
            // Created before the check: a guard dropped in between still
            // wakes this future.
            let notified = self.notify.notified();
            {
                let mut inner = self.inner.borrow_mut();
                inner
                    .appended
                    .retain(|(_, u)| !PartialOrder::less_equal(u, lower));
                let in_flight = inner.pending.as_ref().is_some_and(|(l, u)| {
                    // It matters unless it ends at or before `lower` or
                    // starts where nothing more is needed.
                    !PartialOrder::less_equal(u, lower) && !done(l)
                });
                if !in_flight {
                    return tiling(&inner.appended, lower, done);
                }
            }
            notified.await;
        }
    }
}

/// The intervals of `appended` (sorted, none ending at or before `lower`)
/// from `lower` on, if they cover it without a gap until `done(covered)`.
fn tiling<T: Timestamp>(
    appended: &[Bounds<T>],
    lower: &Antichain<T>,
    done: impl Fn(&Antichain<T>) -> bool,
) -> Option<Vec<Bounds<T>>> {
    let mut covered = lower.clone();
    let mut out = Vec::new();
    for (l, u) in appended {
        if done(&covered) {
            break;
        }
        if !PartialOrder::less_equal(l, &covered) {
            // A gap before this append.
            return None;
        }
        out.push((l.clone(), u.clone()));
        covered.clone_from(u);
    }
    done(&covered).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn f(t: u64) -> Antichain<u64> {
        Antichain::from_elem(t)
    }

    fn now<F: Future>(future: F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        pin!(future).poll(&mut cx)
    }

    fn covering(own: &OwnAppends<u64>, lower: u64, upper: Option<u64>) -> Option<Vec<(u64, u64)>> {
        let upper = upper.map_or_else(Antichain::new, f);
        match now(own.covering(&f(lower), &upper)) {
            Poll::Ready(out) => out.map(|v| {
                v.into_iter()
                    .map(|(l, u)| (l[0], u.as_option().copied().unwrap_or(u64::MAX)))
                    .collect()
            }),
            Poll::Pending => panic!("nothing in flight, yet waiting"),
        }
    }

    #[test]
    fn covers_only_what_was_appended() {
        let own = OwnAppends::<u64>::new();
        assert_eq!(covering(&own, 0, Some(1)), None);
        own.record(&f(2), &f(4));
        own.record(&f(4), &f(7));
        own.record(&f(9), &Antichain::new());
        assert_eq!(covering(&own, 2, Some(4)), Some(vec![(2, 4)]));
        assert_eq!(covering(&own, 2, Some(7)), Some(vec![(2, 4), (4, 7)]));
        assert_eq!(covering(&own, 3, Some(5)), Some(vec![(2, 4), (4, 7)]));
        assert_eq!(covering(&own, 6, Some(8)), None);
        assert_eq!(covering(&own, 7, Some(9)), None);
        assert_eq!(covering(&own, 9, None), Some(vec![(9, u64::MAX)]));
        // Asking from 9 on forgot what ends before.
        assert_eq!(covering(&own, 2, Some(7)), None);
    }

    #[test]
    fn snapshots_are_covered_through_their_as_of() {
        let own = OwnAppends::<u64>::new();
        let through = |t: u64| now(own.covering_through(&f(0), &f(t)));
        assert_eq!(through(0), Poll::Ready(None));
        own.record(&f(0), &f(2));
        own.record(&f(2), &f(4));
        own.record(&f(4), &f(7));
        assert_eq!(through(1), Poll::Ready(Some(vec![(f(0), f(2))])));
        assert_eq!(
            through(2),
            Poll::Ready(Some(vec![(f(0), f(2)), (f(2), f(4))]))
        );
        // A snapshot through 7 needs time 7 too.
        assert_eq!(through(7), Poll::Ready(None));
        // An append in flight from 7 matters to a snapshot through 7, not
        // to one through 6.
        let _guard = own.start(&f(7), &f(9));
        assert_eq!(through(6).map(|c| c.map(|v| v.len())), Poll::Ready(Some(3)));
        let (zero, seven) = (f(0), f(7));
        let mut waiting = Box::pin(own.covering_through(&zero, &seven));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Pending);
    }

    #[test]
    fn waits_for_an_overlapping_append_in_flight() {
        let own = OwnAppends::<u64>::new();
        let guard = own.start(&f(3), &f(5));
        // Disjoint intervals are answered at once.
        assert_eq!(covering(&own, 0, Some(3)), None);
        let (three, five, eight) = (f(3), f(5), f(8));
        let mut waiting = Box::pin(own.covering(&three, &five));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Pending);
        own.record(&three, &five);
        drop(guard);
        assert_eq!(
            waiting.as_mut().poll(&mut cx),
            Poll::Ready(Some(vec![(three.clone(), five.clone())]))
        );
        // An append that ends without a record (failed, cancelled) releases
        // waiters with "not covered".
        let guard = own.start(&five, &eight);
        let mut waiting = Box::pin(own.covering(&five, &eight));
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Pending);
        drop(guard);
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(None));
    }
}
