//! Connection drivers that, while the process is busy, run after the tasks already scheduled
//! rather than right after whatever woke them, so that what several requests wrote in one
//! turn leaves together.
//!
//! Both transports have a task per connection that owns its socket: quinn's connection driver
//! (and its endpoint's), and the task polling an HTTP/2 connection. A stream write queues its
//! bytes and wakes that task. tokio runs the task that a running task wakes next (its "LIFO
//! slot"), so under load each request's head (at the edge) or answer (at the connector) left
//! right after the task that wrote it, in a packet (QUIC) or a TLS record and a `write`
//! (HTTP/2) of its own, and the peer woke up for each. Deferred to the end of its worker's
//! turn, the driver finds what the other tasks run in that turn wrote, and sends it together:
//! fewer packets or records, fewer system calls, fewer wake-ups at the other end.
//!
//! A process serving one request at a time has nothing to gather, and a deferral costs it a
//! turn of the scheduler (another look at the sockets, and often the other worker woken) on
//! every wake-up: in alternating runs, a client sending one request at a time got 16–23% fewer
//! answers per second when QUIC's drivers always deferred. So a driver defers only while more
//! than one request stream is open in the process ([`Open`]), which is also the scope of what
//! it could gather: the scheduler's workers are the process's. (A long-lived TCP session
//! counts as one, so a process holding one defers beside a lone request too.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::task::AtomicWaker;

/// Halves of request streams open in this process, over either transport.
static OPEN_HALVES: AtomicUsize = AtomicUsize::new(0);

/// One half of a stream, counted as open until dropped when it carries a request or a
/// session; a connection's control stream, open for as long as the connection, is not.
#[derive(Debug)]
pub struct Open(bool);

impl Open {
    pub(crate) fn request() -> Self {
        OPEN_HALVES.fetch_add(1, Ordering::Relaxed);
        Open(true)
    }

    pub(crate) fn control() -> Self {
        Open(false)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0 {
            OPEN_HALVES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether a driver should defer, with `open` stream halves in the process: more than one
/// stream's two.
fn busy(open: usize) -> bool {
    open > 2
}

/// Spawns a connection's driver on the current runtime, deferring while the process is busy.
pub(super) fn spawn(driver: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(Deferring::new(Box::pin(driver)));
}

/// A driver task that, while its process is busy, lets the tasks already scheduled run before
/// it.
pub(super) struct Deferring {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    wakes: Arc<Wakes>,
    /// The waker `inner` is polled with: it passes wakes on to the task's, except while the
    /// task waits for its deferred turn, which polls it anyway.
    waker: Waker,
    /// Whether the task is waiting for its deferred turn.
    deferred: bool,
}

/// Where the wake-ups of one [`Deferring`] task go.
#[derive(Default)]
struct Wakes {
    /// Set while the task waits for its deferred turn.
    deferred: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.deferred.load(Ordering::Acquire) {
            self.task.wake();
        }
    }
}

impl Deferring {
    pub(super) fn new(inner: Pin<Box<dyn Future<Output = ()> + Send>>) -> Self {
        let wakes = Arc::new(Wakes::default());
        Deferring {
            inner,
            waker: Waker::from(wakes.clone()),
            wakes,
            deferred: false,
        }
    }
}

impl Future for Deferring {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.wakes.task.register(cx.waker());
        if !std::mem::take(&mut this.deferred) && busy(OPEN_HALVES.load(Ordering::Relaxed)) {
            // tokio's yield puts the task's waker behind everything runnable on this worker
            // (and behind a look at the sockets when nothing else is).
            let yield_now = std::pin::pin!(tokio::task::yield_now());
            if yield_now.poll(cx).is_pending() {
                this.deferred = true;
                this.wakes.deferred.store(true, Ordering::Release);
                return Poll::Pending;
            }
        }
        // Before `inner` looks at its state, so that no wake-up it should see is held back.
        this.wakes.deferred.store(false, Ordering::Release);
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_defer_only_beside_another_stream() {
        assert!(!busy(0));
        // One request: its stream's two halves.
        assert!(!busy(2));
        assert!(busy(3));
        assert!(busy(128));
    }
}
