//! Timers: a sorted map of deadlines owned by the reactor. A `Sleep` registers on its first
//! pending poll and removes itself when dropped, so abandoned timeouts cost nothing later.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::current;

pub struct Sleep {
    deadline: Instant,
    id: Option<u64>,
}

/// Completes after `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        deadline: Instant::now() + duration,
        id: None,
    }
}

/// Completes at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep { deadline, id: None }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(id) = self.id.take() {
                current().reactor.cancel_timer(self.deadline, id);
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let id = current()
            .reactor
            .set_timer(deadline, self.id, cx.waker().clone());
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            super::CURRENT.with(|c| {
                if let Some(exec) = c.borrow().as_ref() {
                    exec.reactor.cancel_timer(self.deadline, id);
                }
            });
        }
    }
}

/// Runs `fut` for at most `limit`; `None` when time ran out (the future is dropped).
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        sleep(limit).await;
        None
    })
    .await
}
