//! Waiting for rare events beside busy work.
//!
//! A task that serves a connection waits, in one `select!`, for its work and for signals that
//! almost never come (shutdown, a drain, a kill). `select!` polls every branch each time the
//! task wakes, and the work wakes it several times per request: each poll of
//! [`CancellationToken::cancelled`] takes the token's lock and its notifier's lock, and a
//! future created anew in a loop registers with the notifier and leaves it again every turn.
//! [`Dormant`] keeps one such future for the task's life and polls it only after it woke the
//! task itself.
//!
//! [`CancellationToken::cancelled`]: tokio_util::sync::CancellationToken::cancelled

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// `F`, polled only on its first poll and after it woke the task, so that wake-ups caused by
/// other branches of a `select!` cost an atomic load. Create it once, outside the loop that
/// selects on it, and select on `&mut` it. Once `F` is done it stays pending.
pub struct Dormant<F> {
    /// `None` once done.
    inner: Option<Pin<Box<F>>>,
    flag: Arc<Flag>,
    /// Hands `inner`'s wake-ups to `flag`.
    waker: Waker,
    /// The task's waker `flag` holds (compared without taking its lock).
    task: Option<Waker>,
}

/// Set when the inner future wakes; forwards the wake-up to the task.
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = &*task {
            t.wake_by_ref();
        }
    }
}

impl<F: Future> Dormant<F> {
    /// Wraps `inner` (boxed: it is polled through a stable address for as long as it lives).
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            // The first poll polls `inner`, which registers its own wake-up.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Dormant {
            inner: Some(Box::pin(inner)),
            waker: Waker::from(flag.clone()),
            flag,
            task: None,
        }
    }
}

impl<F: Future> Future for Dormant<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            // Before `woken` is read: a wake-up from here on reaches this waker, one before
            // has set `woken`.
            let task = cx.waker().clone();
            *this
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            this.task = Some(task);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Pending;
        };
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let done = inner.as_mut().poll(&mut Context::from_waker(&this.waker));
        if done.is_ready() {
            this.inner = None;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// Pending until `token` is cancelled, counting its polls.
    fn counted(token: &CancellationToken, polls: Arc<AtomicUsize>) -> impl Future<Output = ()> {
        let token = token.clone();
        let mut wait = Box::pin(token.cancelled_owned());
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            wait.as_mut().poll(cx)
        })
    }

    #[tokio::test]
    async fn polled_only_after_waking_the_task() {
        let token = CancellationToken::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut stop = Dormant::new(counted(&token, polls.clone()));
        // Another branch wakes the task a hundred times (a yield wakes it at once).
        let mut turns = 0;
        loop {
            tokio::select! {
                biased;
                () = &mut stop => panic!("not cancelled yet"),
                () = tokio::task::yield_now() => turns += 1,
            }
            if turns == 100 {
                break;
            }
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "polled beside other wake-ups"
        );
        let canceller = token.clone();
        tokio::spawn(async move { canceller.cancel() });
        tokio::time::timeout(Duration::from_secs(10), &mut stop)
            .await
            .expect("the cancellation wakes the task");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn done_at_once_when_already_cancelled_then_pending() {
        let token = CancellationToken::new();
        token.cancel();
        let mut stop = Dormant::new(token.cancelled());
        tokio::time::timeout(Duration::from_secs(10), &mut stop)
            .await
            .expect("already cancelled");
        // Done: selected on again (a branch whose pattern did not match), it stays pending
        // rather than polling a finished future.
        let again = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut stop).poll(cx))).await;
        assert!(again.is_pending());
    }

    #[tokio::test]
    async fn follows_the_task_when_polled_by_another() {
        let token = CancellationToken::new();
        let mut stop = Dormant::new(token.clone().cancelled_owned());
        // First polled by this task, then moved into another that waits on it.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut stop).poll(cx))).await;
        assert!(first.is_pending());
        let waiter = tokio::spawn(stop);
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the new task is woken")
            .unwrap();
    }
}
