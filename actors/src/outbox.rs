//! A session's outbox on its socket thread: where that thread's lane puts the session's frames.
//!
//! A lane (`fanout`) runs on the thread of the sessions it delivers to. Through a session's
//! actix mailbox each delivery costs an envelope and a queue node (two allocations), atomic
//! counters and a wake through the mailbox's shared state, all touching memory of its own. An
//! outbox is a plain queue that only its thread touches: the lane pushes the frame and wakes
//! the session's task once; the session drains it as a stream (`SessionActor`'s
//! `StreamHandler<Outgoing>`). It is bounded like the mailbox (`limits.max_outbound`): a full
//! outbox cuts the session off, as a full mailbox does. A session without an outbox on the
//! lane's thread (none opened, or already closed) is sent to through its mailbox, as before.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytestring::ByteString;
use futures_util::Stream;

use crate::presence::SessionId;

/// A frame for one of the session's topics.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: Arc<str>,
    pub frame: ByteString,
}

struct Queue {
    frames: VecDeque<Outgoing>,
    /// The session's task, once it has found the queue empty.
    waker: Option<Waker>,
    capacity: usize,
}

type Shared = Rc<RefCell<Queue>>;

thread_local! {
    static OUTBOXES: RefCell<HashMap<SessionId, Shared, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// The receiving end: a stream of the session's frames that never ends. Dropping it (with the
/// session) closes the outbox.
pub struct Outbox {
    session: SessionId,
    queue: Shared,
}

/// Opens `session`'s outbox on this thread, holding at most `capacity` frames.
pub fn open(session: SessionId, capacity: usize) -> Outbox {
    let queue = Rc::new(RefCell::new(Queue {
        frames: VecDeque::new(),
        waker: None,
        capacity: capacity.max(1),
    }));
    OUTBOXES.with(|o| o.borrow_mut().insert(session, queue.clone()));
    Outbox { session, queue }
}

/// Puts `frame` in `session`'s outbox, if it has one on this thread (`None` if not). As
/// `fanout::offer`: `Err(true)` if the outbox is full; the frame is then not queued.
pub(crate) fn offer(
    session: SessionId,
    topic: &Arc<str>,
    frame: &ByteString,
) -> Option<Result<(), bool>> {
    let taken = OUTBOXES.with(|o| {
        let o = o.borrow();
        let mut q = o.get(&session)?.borrow_mut();
        if q.frames.len() >= q.capacity {
            return Some(Err(true));
        }
        q.frames.push_back(Outgoing {
            topic: topic.clone(),
            frame: frame.clone(),
        });
        Some(Ok(q.waker.take()))
    })?;
    // Woken outside the borrows: a waker may run code of its own.
    Some(taken.map(|waker| {
        if let Some(w) = waker {
            w.wake();
        }
    }))
}

impl Stream for Outbox {
    type Item = Outgoing;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let mut q = self.queue.borrow_mut();
        match q.frames.pop_front() {
            Some(f) => Poll::Ready(Some(f)),
            None => {
                // Most sessions get a frame now and then: an idle one keeps no buffer.
                if q.frames.capacity() > 0 {
                    q.frames = VecDeque::new();
                }
                if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    q.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // `try_with`: a session dropped while its thread shuts down finds the table gone.
        let _ = OUTBOXES.try_with(|o| {
            let mut o = o.borrow_mut();
            if o.get(&self.session)
                .is_some_and(|q| Rc::ptr_eq(q, &self.queue))
            {
                o.remove(&self.session);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn frame(s: &str) -> ByteString {
        ByteString::from(s.to_string())
    }

    #[actix_rt::test]
    async fn an_outbox_yields_its_frames_in_order_up_to_its_capacity_and_closes_when_dropped() {
        let topic: Arc<str> = "room:lobby".into();
        let mut out = open(SessionId(7), 2);
        assert_eq!(offer(SessionId(7), &topic, &frame("1")), Some(Ok(())));
        assert_eq!(offer(SessionId(7), &topic, &frame("2")), Some(Ok(())));
        assert_eq!(
            offer(SessionId(7), &topic, &frame("3")),
            Some(Err(true)),
            "full"
        );
        assert_eq!(
            offer(SessionId(8), &topic, &frame("x")),
            None,
            "no outbox here"
        );
        let got: Vec<String> = (&mut out)
            .take(2)
            .map(|o| o.frame.to_string())
            .collect()
            .await;
        assert_eq!(got, ["1", "2"]);
        assert_eq!(offer(SessionId(7), &topic, &frame("4")), Some(Ok(())));
        assert_eq!(
            out.next().await.map(|o| o.frame.to_string()).as_deref(),
            Some("4")
        );
        drop(out);
        assert_eq!(offer(SessionId(7), &topic, &frame("5")), None, "closed");
    }

    #[actix_rt::test]
    async fn a_frame_wakes_a_session_waiting_on_its_outbox() {
        let topic: Arc<str> = "room:lobby".into();
        let mut out = open(SessionId(9), 4);
        let waiting = actix_rt::spawn(async move { out.next().await.map(|o| o.frame.to_string()) });
        // Let it find the outbox empty and wait.
        for _ in 0..10 {
            actix_rt::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        assert_eq!(offer(SessionId(9), &topic, &frame("hi")), Some(Ok(())));
        assert_eq!(waiting.await.unwrap().as_deref(), Some("hi"));
    }
}
