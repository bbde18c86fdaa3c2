//! A queue from any number of senders to one task that costs almost nothing while empty.
//!
//! Every connection has two queues that are empty nearly all its life: the events its client
//! sent that its session task has not handled yet, and the requests other servers made of it
//! (join, leave, disconnect). A tokio channel allocates its shared state, padded to cache
//! lines, and its first block of 32 slots when it is created: about 1.3 KiB for the unbounded
//! control channel and 0.8 KiB for the inbox (heaptrack, 2,000 idle Socket.IO connections).
//! A mailbox is one small allocation; its `VecDeque` allocates only when something is queued,
//! and gives a burst's capacity back once it is drained.
//!
//! The API follows tokio's `mpsc`: [`Sender::try_send`] refuses when the mailbox is full or its
//! receiver is gone, [`Receiver::recv`] returns `None` once every sender is dropped and the
//! queue is empty, and dropping the receiver closes the mailbox. `recv` is cancel safe: an
//! item is taken out of the queue only by the poll that returns it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A drained queue keeps at most this many slots of capacity.
const KEPT_CAPACITY: usize = 8;

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    notify: Notify,
    senders: AtomicUsize,
    capacity: usize,
}

/// What the lock guards: the items, and whether the receiver is gone (set under the same
/// lock, so nothing is queued after the receiver's drop).
struct Queue<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> Shared<T> {
    fn queue(&self) -> MutexGuard<'_, Queue<T>> {
        // A panic while holding the lock leaves a consistent queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The mailbox holds its capacity.
    Full(T),
    /// The receiver was dropped.
    Closed(T),
}

impl<T> TrySendError<T> {
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(item) | Self::Closed(item) => item,
        }
    }
}

/// The sending half; clone it for more senders.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half, owned by the one task that handles what is queued.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A mailbox that holds at most `capacity` items.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            closed: false,
        }),
        notify: Notify::new(),
        senders: AtomicUsize::new(1),
        capacity,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// A mailbox without a limit, for senders that must not wait or drop (they are rare).
pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    bounded(usize::MAX)
}

impl<T> Sender<T> {
    /// Queues `item` unless the mailbox is full or its receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut queue = self.shared.queue();
            if queue.closed {
                return Err(TrySendError::Closed(item));
            }
            if queue.items.len() >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            queue.items.push_back(item);
        }
        self.shared.notify.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.notify.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the queue is empty and no sender is left.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut queue = self.shared.queue();
                if let Some(item) = queue.items.pop_front() {
                    if queue.items.is_empty() && queue.items.capacity() > KEPT_CAPACITY {
                        queue.items = VecDeque::new();
                    }
                    return Some(item);
                }
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                // A send may have landed between the check above and the last sender's drop.
                return self.shared.queue().items.pop_front();
            }
            // notify_one keeps a permit when nobody waits, so a send between the check above
            // and this await still wakes it.
            self.shared.notify.notified().await;
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut queue = self.shared.queue();
            queue.closed = true;
            std::mem::take(&mut queue.items)
        };
        // What was queued goes now (outside the lock), not when the last sender does.
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_and_a_full_mailbox_refuses() {
        let (tx, mut rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(4));
    }

    #[tokio::test]
    async fn recv_wakes_for_a_later_send_and_ends_when_the_senders_are_gone() {
        let (tx, mut rx) = unbounded();
        let tx2 = tx.clone();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx2.try_send("late").map_err(TrySendError::into_inner)
        });
        assert_eq!(rx.recv().await, Some("late"));
        assert_eq!(sender.await.ok(), Some(Ok(())));
        assert_eq!(tx.try_send("last"), Ok(()));
        drop(tx);
        assert_eq!(rx.recv().await, Some("last"), "queued before the drop");
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_dropped_receiver_closes_the_mailbox() {
        let (tx, rx) = bounded(4);
        assert_eq!(tx.try_send(1), Ok(()));
        drop(rx);
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
    }

    #[tokio::test]
    async fn a_cancelled_recv_loses_nothing() {
        let (tx, mut rx) = bounded(4);
        // A recv that loses a select to another branch, while waiting.
        tokio::select! {
            _ = rx.recv() => panic!("nothing was sent"),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        assert_eq!(tx.try_send(7), Ok(()));
        assert_eq!(rx.recv().await, Some(7));
    }

    #[tokio::test]
    async fn a_drained_burst_gives_its_capacity_back() {
        let (tx, mut rx) = bounded(1024);
        for i in 0..1000 {
            assert_eq!(tx.try_send(i), Ok(()));
        }
        for i in 0..1000 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert_eq!(rx.shared.queue().items.capacity(), 0);
    }
}
