//! Bounded fan-out: one serialised frame to many sessions without letting any mailbox grow past
//! its capacity. A subscriber whose mailbox is full is cut off, never waited for.
//!
//! A large fan-out can hand its frames to a `Scatter` actor on another thread (`scatter_past`):
//! a room that runs on a socket thread, next to its members, would otherwise push thousands of
//! frames from that thread before any of its own sessions could write one, while the other
//! socket threads wait for it. The scatter pushes them from a thread of its own, as a room on
//! an arbiter does.
//!
//! A fan-out can also be given lanes (`use_lanes`): each socket thread runs a `Scatter` of its
//! own (`start_this_threads_lane`), and a subscriber that joined with its thread's lane gets
//! its frames through it. A frame then crosses to each thread once, with the list of that
//! thread's subscribers, instead of once per subscriber; the lane hands it to each of them on
//! their own thread, where waking a session is a local queue push rather than a locked
//! cross-thread wake (and, for a sleeping thread, a system call). A session that opened an
//! outbox on that thread (`outbox`, as the server's sessions do) gets the frame there rather
//! than through its mailbox.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use bytestring::ByteString;

use crate::messages::{SessionAddr, ToSession};
use crate::metrics::Metrics;
use crate::presence::{Key, SessionId};
use crate::protocol::Reason;

pub struct Subscriber {
    pub user: Key,
    pub to: SessionAddr,
    /// The lane of the subscriber's thread, if it runs on a socket thread.
    pub lane: Option<Lane>,
}

/// A socket thread's `Scatter` (see the module's note).
#[derive(Clone)]
pub struct Lane {
    /// The socket thread's index.
    pub id: usize,
    pub to: Addr<Scatter>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lane({})", self.id)
    }
}

thread_local! {
    static LANE: RefCell<Option<Lane>> = const { RefCell::new(None) };
}

/// Starts this thread's lane: a `Scatter` on this thread's arbiter. Called once by each socket
/// thread as it starts.
pub fn start_this_threads_lane(id: usize, metrics: Metrics) {
    let to = Scatter::new(metrics).start();
    LANE.with(|l| *l.borrow_mut() = Some(Lane { id, to }));
}

/// The lane of the calling thread, if it is a socket thread.
pub fn this_threads_lane() -> Option<Lane> {
    LANE.with(|l| l.borrow().clone())
}

#[derive(Default)]
pub struct Fanout {
    subs: HashMap<SessionId, Member>,
    scatter: Option<Scattering>,
    /// Set by `use_lanes`: the lanes of the subscribers that have one.
    lanes: Option<Lanes>,
    /// Subscribers without a lane (all of them without lanes).
    direct: usize,
}

/// A subscriber as a fan-out keeps it.
struct Member {
    user: Key,
    reach: Reach,
}

/// How a fan-out reaches a subscriber.
enum Reach {
    /// Sent to directly (or through the scatter), at this address.
    Direct(SessionAddr),
    /// Through the lane of this id, which holds its address.
    Lane(usize),
}

/// The subscribers of a fan-out by lane, each lane's as the lane is given them.
struct Lanes {
    cutoff: Recipient<Cutoff>,
    each: Vec<LaneSubs>,
}

struct LaneSubs {
    id: usize,
    to: Addr<Scatter>,
    /// Shared with the frames in flight; changed in place once none holds it.
    list: Recipients,
}

/// Subscribers as a scatter or a lane is given them: shared with the frames in flight, and
/// each address shared too, so that copying the list while a frame holds it copies none.
pub type Recipients = Arc<Vec<(SessionId, Arc<SessionAddr>)>>;

impl Lanes {
    /// Adds a subscriber (not in any lane) to its lane.
    fn add(&mut self, session: SessionId, lane: &Lane, to: SessionAddr) {
        let i = match self.each.iter().position(|l| l.id == lane.id) {
            Some(i) => i,
            None => {
                self.each.push(LaneSubs {
                    id: lane.id,
                    to: lane.to.clone(),
                    list: Arc::default(),
                });
                self.each.len() - 1
            }
        };
        Arc::make_mut(&mut self.each[i].list).push((session, Arc::new(to)));
    }

    /// A scan, not an index: a session leaving a room costs a diff to every member anyway,
    /// and an index would cost memory for every subscriber.
    fn remove(&mut self, session: SessionId, lane: usize) {
        let Some(l) = self.each.iter_mut().find(|l| l.id == lane) else {
            return;
        };
        if let Some(at) = l.list.iter().position(|(s, _)| *s == session) {
            Arc::make_mut(&mut l.list).swap_remove(at);
        }
    }

    fn get(&self, session: SessionId, lane: usize) -> Option<(&LaneSubs, &Arc<SessionAddr>)> {
        let l = self.each.iter().find(|l| l.id == lane)?;
        let (_, to) = l.list.iter().find(|(s, _)| *s == session)?;
        Some((l, to))
    }

    /// Hands `frame` to every lane with subscribers, once.
    fn send(&self, frame: &ByteString, skip: &[SessionId], topic: &Arc<str>) {
        for l in self.each.iter().filter(|l| !l.list.is_empty()) {
            l.to.do_send(Scattered {
                topic: topic.clone(),
                frame: frame.clone(),
                to: l.list.clone(),
                skip: skip.to_vec(),
                cutoff: self.cutoff.clone(),
            });
        }
    }
}

/// Where a large fan-out sends its frames, and from when.
struct Scattering {
    to: Addr<Scatter>,
    /// Where the scatter reports the subscribers it could not reach.
    cutoff: Recipient<Cutoff>,
    /// Subscribers past which frames go through the scatter.
    past: usize,
    /// Set once the fan-out has grown past `past`, and never unset: a frame handed over later
    /// must not overtake one the scatter still holds.
    on: bool,
    /// The subscribers as the scatter is given them, until they change.
    list: Option<Recipients>,
}

/// Subscribers that could not take a frame, and why.
pub struct Dropped {
    pub session: SessionId,
    pub user: Key,
    /// `false` when the session is already gone (its own stop will clean up).
    pub slow: bool,
}

impl Fanout {
    /// Once it has more than `past` subscribers, hand every frame to `to` (see the module's
    /// note); subscribers it cannot reach are reported to `cutoff`.
    pub fn scatter_past(&mut self, past: usize, to: Addr<Scatter>, cutoff: Recipient<Cutoff>) {
        self.scatter = Some(Scattering {
            to,
            cutoff,
            past,
            on: false,
            list: None,
        });
    }

    /// Sends the frames of subscribers that have a lane through it (see the module's note);
    /// the lanes report the subscribers they cannot reach to `cutoff`. Not with `scatter_past`
    /// (a frame must not overtake another by taking a different way): this is for fan-outs
    /// without a scatter, and before any subscriber is inserted.
    pub fn use_lanes(&mut self, cutoff: Recipient<Cutoff>) {
        debug_assert!(self.subs.is_empty() && self.scatter.is_none());
        if self.scatter.is_none() {
            self.lanes = Some(Lanes {
                cutoff,
                each: Vec::new(),
            });
        }
    }

    /// Whether frames go through a scatter.
    pub fn scattering(&self) -> bool {
        self.scatter.as_ref().is_some_and(|s| s.on)
    }

    /// Adds a subscriber, or replaces it (a session that joins again).
    pub fn insert(&mut self, session: SessionId, sub: Subscriber) {
        self.remove_member(session);
        let reach = match (&mut self.lanes, sub.lane) {
            (Some(lanes), Some(lane)) => {
                lanes.add(session, &lane, sub.to);
                Reach::Lane(lane.id)
            }
            _ => {
                self.direct += 1;
                Reach::Direct(sub.to)
            }
        };
        let user = sub.user;
        self.subs.insert(session, Member { user, reach });
        if let Some(s) = &mut self.scatter {
            s.list = None;
            s.on |= self.subs.len() > s.past;
        }
    }

    /// Removes a subscriber; its user, if it was one.
    pub fn remove(&mut self, session: SessionId) -> Option<Key> {
        let (user, _) = self.remove_member(session)?;
        if let Some(s) = &mut self.scatter {
            s.list = None;
        }
        Some(user)
    }

    /// Takes a subscriber out of `subs` and of its lane; its user, and its address if it was
    /// sent to directly.
    fn remove_member(&mut self, session: SessionId) -> Option<(Key, Option<SessionAddr>)> {
        let m = self.subs.remove(&session)?;
        let to = match m.reach {
            Reach::Lane(lane) => {
                if let Some(lanes) = &mut self.lanes {
                    lanes.remove(session, lane);
                }
                None
            }
            Reach::Direct(to) => {
                self.direct -= 1;
                Some(to)
            }
        };
        Some((m.user, to))
    }

    pub fn contains(&self, session: SessionId) -> bool {
        self.subs.contains_key(&session)
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Sends `frame` to everyone except `except`. Subscribers that cannot take it are removed
    /// from the fan-out and returned; slow ones are told why, once, past their capacity.
    pub fn send(
        &mut self,
        frame: &ByteString,
        except: Option<SessionId>,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        self.send_skipping(frame, except.as_slice(), topic, metrics)
    }

    /// `send` to everyone but the sessions in `skip` (a few, so a slice).
    pub fn send_skipping(
        &mut self,
        frame: &ByteString,
        skip: &[SessionId],
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        if let Some(s) = self.scatter.as_mut().filter(|s| s.on) {
            let subs = &self.subs;
            let list = s.list.get_or_insert_with(|| {
                // No lanes beside a scatter: every member is direct.
                Arc::new(
                    subs.iter()
                        .filter_map(|(id, m)| match &m.reach {
                            Reach::Direct(to) => Some((*id, Arc::new(to.clone()))),
                            Reach::Lane(_) => None,
                        })
                        .collect(),
                )
            });
            s.to.do_send(Scattered {
                topic: topic.clone(),
                frame: frame.clone(),
                to: list.clone(),
                skip: skip.to_vec(),
                cutoff: s.cutoff.clone(),
            });
            return Vec::new();
        }
        if let Some(lanes) = &self.lanes {
            lanes.send(frame, skip, topic);
        }
        if self.direct == 0 {
            return Vec::new();
        }
        let mut dropped = Vec::new();
        let mut delivered = 0u64;
        for (id, m) in self.subs.iter() {
            let Reach::Direct(to) = &m.reach else {
                continue;
            };
            if skip.contains(id) {
                continue;
            }
            match offer(to, topic, frame) {
                Ok(()) => delivered += 1,
                Err(slow) => dropped.push(Dropped {
                    session: *id,
                    user: m.user.clone(),
                    slow,
                }),
            }
        }
        self.settle(delivered, dropped, topic, metrics)
    }

    /// `send` to one subscriber only (none if it is not one).
    pub fn send_one(
        &mut self,
        session: SessionId,
        frame: &ByteString,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        let Some(m) = self.subs.get(&session) else {
            return Vec::new();
        };
        let to = match (&m.reach, &self.lanes) {
            (Reach::Direct(to), _) => to,
            (Reach::Lane(lane), Some(lanes)) => {
                if let Some((l, to)) = lanes.get(session, *lane) {
                    l.to.do_send(Scattered {
                        topic: topic.clone(),
                        frame: frame.clone(),
                        to: Arc::new(vec![(session, to.clone())]),
                        skip: Vec::new(),
                        cutoff: lanes.cutoff.clone(),
                    });
                }
                return Vec::new();
            }
            (Reach::Lane(_), None) => return Vec::new(),
        };
        if let Some(s) = self.scatter.as_ref().filter(|s| s.on) {
            s.to.do_send(Scattered {
                topic: topic.clone(),
                frame: frame.clone(),
                to: Arc::new(vec![(session, Arc::new(to.clone()))]),
                skip: Vec::new(),
                cutoff: s.cutoff.clone(),
            });
            return Vec::new();
        }
        match offer(to, topic, frame) {
            Ok(()) => self.settle(1, Vec::new(), topic, metrics),
            Err(slow) => {
                let d = Dropped {
                    session,
                    user: m.user.clone(),
                    slow,
                };
                self.settle(0, vec![d], topic, metrics)
            }
        }
    }

    /// Counts the deliveries and cuts off those that could not take the frame.
    fn settle(
        &mut self,
        delivered: u64,
        dropped: Vec<Dropped>,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        metrics.deliveries.inc_by(delivered);
        for d in &dropped {
            if let Some((_, Some(to))) = self.remove_member(d.session) {
                if d.slow {
                    evict_slow(&to, topic, metrics);
                }
            }
        }
        if !dropped.is_empty() {
            if let Some(s) = &mut self.scatter {
                s.list = None;
            }
        }
        dropped
    }
}

/// One frame for a fan-out's subscribers but `skip`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Scattered {
    pub topic: Arc<str>,
    pub frame: ByteString,
    pub to: Recipients,
    pub skip: Vec<SessionId>,
    pub cutoff: Recipient<Cutoff>,
}

/// Subscribers a scatter could not reach: `true`, their queue was full (they were told they
/// are cut off), else they are gone. Their fan-out drops them (`Fanout::remove`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Cutoff {
    pub sessions: Vec<(SessionId, bool)>,
}

/// Pushes large fan-outs' frames from its own thread (see the module's note). One per engine
/// arbiter; a fan-out uses one for its whole life, so its frames stay in order.
pub struct Scatter {
    metrics: Metrics,
    /// Sessions it cut off lately: until their fan-out has dropped them, later frames for them
    /// are skipped rather than cut off again.
    cut: HashSet<SessionId>,
    cut_order: VecDeque<SessionId>,
}

/// How many cut-off sessions a scatter remembers.
const CUT_REMEMBERED: usize = 4096;

impl Scatter {
    pub fn new(metrics: Metrics) -> Scatter {
        Scatter {
            metrics,
            cut: HashSet::new(),
            cut_order: VecDeque::new(),
        }
    }

    fn remember_cut(&mut self, session: SessionId) {
        if self.cut.insert(session) {
            self.cut_order.push_back(session);
        }
        if self.cut_order.len() > CUT_REMEMBERED {
            if let Some(old) = self.cut_order.pop_front() {
                self.cut.remove(&old);
            }
        }
    }
}

impl Actor for Scatter {
    type Context = Context<Self>;
}

impl Handler<Scattered> for Scatter {
    type Result = ();

    fn handle(&mut self, msg: Scattered, _: &mut Context<Self>) {
        let mut delivered = 0u64;
        let mut cut = Vec::new();
        for (id, to) in msg.to.iter() {
            if msg.skip.contains(id) || self.cut.contains(id) {
                continue;
            }
            // A lane finds its thread's sessions' outboxes; anyone else goes by mailbox.
            let offered = crate::outbox::offer(*id, &msg.topic, &msg.frame)
                .unwrap_or_else(|| offer(to, &msg.topic, &msg.frame));
            match offered {
                Ok(()) => delivered += 1,
                Err(slow) => {
                    if slow {
                        evict_slow(to, &msg.topic, &self.metrics);
                    }
                    cut.push((*id, slow));
                }
            }
        }
        self.metrics.deliveries.inc_by(delivered);
        for (id, _) in &cut {
            self.remember_cut(*id);
        }
        if !cut.is_empty() {
            msg.cutoff.do_send(Cutoff { sessions: cut });
        }
    }
}

/// Tells a subscriber whose queue is full that it is cut off from `topic`: one message past
/// capacity, once; the session closes itself when it runs.
fn evict_slow(to: &SessionAddr, topic: &Arc<str>, metrics: &Metrics) {
    metrics
        .outbound_drops
        .with_label_values(&["slow_consumer"])
        .inc();
    to.do_send(ToSession::Evicted {
        topic: topic.clone(),
        reason: Reason::SlowConsumer,
    });
}

/// Hands `frame` to one subscriber; `Err(true)` if its queue is full, `Err(false)` if it is gone.
fn offer(to: &SessionAddr, topic: &Arc<str>, frame: &ByteString) -> Result<(), bool> {
    match to.try_send(ToSession::Frame {
        topic: topic.clone(),
        frame: frame.clone(),
    }) {
        Ok(()) => Ok(()),
        Err(SendError::Full(_)) => Err(true),
        Err(SendError::Closed(_)) => Err(false),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    type Seen = Rc<RefCell<Vec<String>>>;

    #[derive(Clone, Copy, PartialEq)]
    pub(crate) enum Kind {
        Reads,
        /// Never reads its mailbox (of capacity 1).
        Stuck,
        /// Stops at once.
        Gone,
    }

    /// A session that records its frames (the room's tests use it too).
    struct Session {
        seen: Seen,
        kind: Kind,
    }

    impl Actor for Session {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            match self.kind {
                Kind::Reads => {}
                Kind::Stuck => {
                    ctx.set_mailbox_capacity(1);
                    ctx.wait(actix::fut::wrap_future(
                        futures_util::future::pending::<()>(),
                    ));
                }
                Kind::Gone => ctx.stop(),
            }
        }
    }

    impl Handler<ToSession> for Session {
        type Result = ();
        fn handle(&mut self, msg: ToSession, _: &mut Context<Self>) {
            if let ToSession::Frame { frame, .. } = msg {
                self.seen.borrow_mut().push(frame.to_string());
            }
        }
    }

    type Reported = Rc<RefCell<Vec<(SessionId, bool)>>>;

    /// Records what a scatter reports.
    #[derive(Default)]
    struct Cuts(Reported);

    impl Actor for Cuts {
        type Context = Context<Self>;
    }

    impl Handler<Cutoff> for Cuts {
        type Result = ();
        fn handle(&mut self, msg: Cutoff, _: &mut Context<Self>) {
            self.0.borrow_mut().extend(msg.sessions);
        }
    }

    pub(crate) fn session(kind: Kind) -> (Seen, Subscriber) {
        let seen = Seen::default();
        let addr = Session {
            seen: seen.clone(),
            kind,
        }
        .start();
        let sub = Subscriber {
            user: "u".into(),
            to: addr.recipient(),
            lane: None,
        };
        (seen, sub)
    }

    async fn settle() {
        for _ in 0..50 {
            actix_rt::task::yield_now().await;
        }
    }

    fn frame(s: &str) -> ByteString {
        ByteString::from(s.to_string())
    }

    /// A fan-out that scatters past `past` subscribers, its metrics, a topic, and what its
    /// scatter reports.
    fn scattering_past(past: usize) -> (Fanout, Metrics, Arc<str>, Reported) {
        let metrics = Metrics::new(&prometheus::Registry::new());
        let scatter = Scatter::new(metrics.clone()).start();
        let cuts = Cuts::default();
        let reported = cuts.0.clone();
        let mut fan = Fanout::default();
        fan.scatter_past(past, scatter, cuts.start().recipient());
        (fan, metrics, "room:lobby".into(), reported)
    }

    #[actix_rt::test]
    async fn past_its_threshold_a_fanout_hands_every_frame_to_its_scatter_and_order_holds() {
        let (mut fan, metrics, topic, reported) = scattering_past(2);
        let (a, sub_a) = session(Kind::Reads);
        let (b, sub_b) = session(Kind::Reads);
        fan.insert(SessionId(1), sub_a);
        fan.insert(SessionId(2), sub_b);
        fan.send(&frame("1"), None, &topic, &metrics);
        assert!(!fan.scattering(), "two subscribers are not past two");
        // Nothing has run yet: the first frame sits in the sessions' mailboxes, sent directly.
        let (c, sub_c) = session(Kind::Reads);
        fan.insert(SessionId(3), sub_c);
        assert!(fan.scattering());
        fan.send(&frame("2"), None, &topic, &metrics);
        fan.send_one(SessionId(3), &frame("3 for c"), &topic, &metrics);
        fan.send(&frame("4"), Some(SessionId(1)), &topic, &metrics);
        fan.remove(SessionId(3));
        fan.remove(SessionId(2));
        assert!(fan.scattering(), "once on, it stays on");
        fan.send(&frame("5"), None, &topic, &metrics);
        settle().await;
        assert_eq!(*a.borrow(), ["1", "2", "5"]);
        assert_eq!(*b.borrow(), ["1", "2", "4"]);
        assert_eq!(*c.borrow(), ["2", "3 for c", "4"]);
        assert_eq!(metrics.deliveries.get(), 9);
        assert!(reported.borrow().is_empty());
    }

    #[actix_rt::test]
    async fn a_scatter_cuts_off_a_full_mailbox_once_and_reports_the_gone() {
        let (mut fan, metrics, topic, reported) = scattering_past(0);
        let (ok, sub_ok) = session(Kind::Reads);
        let (_, sub_stuck) = session(Kind::Stuck);
        let (_, sub_gone) = session(Kind::Gone);
        fan.insert(SessionId(1), sub_ok);
        fan.insert(SessionId(2), sub_stuck);
        fan.insert(SessionId(3), sub_gone);
        settle().await;
        for i in 0..6 {
            fan.send(&frame(&i.to_string()), None, &topic, &metrics);
        }
        settle().await;
        assert_eq!(ok.borrow().len(), 6, "the one that reads gets every frame");
        let cut = reported.borrow().clone();
        assert_eq!(
            cut.iter()
                .filter(|(s, slow)| *s == SessionId(2) && *slow)
                .count(),
            1,
            "the stuck one is cut off once: {cut:?}"
        );
        assert_eq!(
            metrics
                .outbound_drops
                .with_label_values(&["slow_consumer"])
                .get(),
            1
        );
        assert!(
            cut.contains(&(SessionId(3), false)),
            "the gone one: {cut:?}"
        );
        assert!(cut.iter().all(|(s, _)| *s != SessionId(1)));
    }

    /// A fan-out with lanes, its metrics, a topic, two lanes, and what the lanes report.
    fn with_lanes() -> (Fanout, Metrics, Arc<str>, [Lane; 2], Reported) {
        let metrics = Metrics::new(&prometheus::Registry::new());
        let lane = |id| Lane {
            id,
            to: Scatter::new(metrics.clone()).start(),
        };
        let lanes = [lane(0), lane(1)];
        let cuts = Cuts::default();
        let reported = cuts.0.clone();
        let mut fan = Fanout::default();
        fan.use_lanes(cuts.start().recipient());
        (fan, metrics, "room:lobby".into(), lanes, reported)
    }

    fn on(lane: &Lane, mut sub: Subscriber) -> Subscriber {
        sub.lane = Some(lane.clone());
        sub
    }

    /// Subscribers on lanes and direct ones side by side: each gets every frame meant for it
    /// once and in order, through a removal, a skip, a frame for one, and a subscriber that
    /// joins again.
    #[actix_rt::test]
    async fn frames_through_lanes_reach_each_subscriber_once_and_in_order() {
        let (mut fan, metrics, topic, [l0, l1], reported) = with_lanes();
        let (a, sub_a) = session(Kind::Reads);
        let (b, sub_b) = session(Kind::Reads);
        let (c, sub_c) = session(Kind::Reads);
        let (d, sub_d) = session(Kind::Reads);
        let c_again = sub_c.to.clone();
        fan.insert(SessionId(1), on(&l0, sub_a));
        fan.insert(SessionId(2), on(&l1, sub_b));
        fan.insert(SessionId(3), on(&l0, sub_c));
        fan.insert(SessionId(4), sub_d);
        settle().await;

        fan.send(&frame("1"), None, &topic, &metrics);
        fan.send(&frame("2"), Some(SessionId(2)), &topic, &metrics);
        fan.send_one(SessionId(3), &frame("3 for c"), &topic, &metrics);
        assert!(fan.remove(SessionId(1)).is_some());
        fan.send(&frame("4"), None, &topic, &metrics);
        // A duplicate join: the same session, from its own thread's lane.
        let again = Subscriber {
            user: "u".into(),
            to: c_again,
            lane: Some(l0.clone()),
        };
        fan.insert(SessionId(3), again);
        fan.send(&frame("5"), None, &topic, &metrics);
        settle().await;

        assert_eq!(*a.borrow(), ["1", "2"]);
        assert_eq!(*b.borrow(), ["1", "4", "5"]);
        assert_eq!(*c.borrow(), ["1", "2", "3 for c", "4", "5"]);
        assert_eq!(*d.borrow(), ["1", "2", "4", "5"]);
        assert_eq!(metrics.deliveries.get(), 14);
        assert_eq!(fan.len(), 3);
        assert!(reported.borrow().is_empty());
    }

    /// A lane cuts off a subscriber whose mailbox is full and reports it, and one that is
    /// gone; once the fan-out drops them (as a room does on `Cutoff`), nothing more is sent
    /// to them.
    #[actix_rt::test]
    async fn a_lane_reports_the_subscribers_it_cannot_reach() {
        let (mut fan, metrics, topic, [l0, _], reported) = with_lanes();
        let (ok, sub_ok) = session(Kind::Reads);
        let (_, sub_stuck) = session(Kind::Stuck);
        let (_, sub_gone) = session(Kind::Gone);
        fan.insert(SessionId(1), on(&l0, sub_ok));
        fan.insert(SessionId(2), on(&l0, sub_stuck));
        fan.insert(SessionId(3), on(&l0, sub_gone));
        settle().await;
        for i in 0..4 {
            fan.send(&frame(&i.to_string()), None, &topic, &metrics);
        }
        settle().await;
        let cut = reported.borrow().clone();
        assert!(cut.contains(&(SessionId(2), true)), "{cut:?}");
        assert!(cut.contains(&(SessionId(3), false)), "{cut:?}");
        assert_eq!(
            metrics
                .outbound_drops
                .with_label_values(&["slow_consumer"])
                .get(),
            1
        );
        for (s, _) in &cut {
            fan.remove(*s);
        }
        fan.send(&frame("last"), None, &topic, &metrics);
        settle().await;
        assert_eq!(*ok.borrow(), ["0", "1", "2", "3", "last"]);
        assert_eq!(fan.len(), 1);
    }

    /// A session that opened an outbox on this thread, as the server's sessions do on a
    /// socket thread; it records which way each frame came. `stuck`: it never drains it.
    struct OutboxSession {
        seen: Seen,
        id: SessionId,
        capacity: usize,
        stuck: bool,
    }

    impl Actor for OutboxSession {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            ctx.add_stream(crate::outbox::open(self.id, self.capacity));
            if self.stuck {
                ctx.wait(actix::fut::wrap_future(
                    futures_util::future::pending::<()>(),
                ));
            }
        }
    }

    impl StreamHandler<crate::outbox::Outgoing> for OutboxSession {
        fn handle(&mut self, item: crate::outbox::Outgoing, _: &mut Context<Self>) {
            self.seen
                .borrow_mut()
                .push(format!("outbox {}", item.frame));
        }
    }

    impl Handler<ToSession> for OutboxSession {
        type Result = ();
        fn handle(&mut self, msg: ToSession, _: &mut Context<Self>) {
            if let ToSession::Frame { frame, .. } = msg {
                self.seen.borrow_mut().push(format!("mailbox {frame}"));
            }
        }
    }

    fn outbox_session(id: u64, capacity: usize, stuck: bool) -> (Seen, Subscriber) {
        let seen = Seen::default();
        let addr = OutboxSession {
            seen: seen.clone(),
            id: SessionId(id),
            capacity,
            stuck,
        }
        .start();
        let sub = Subscriber {
            user: "u".into(),
            to: addr.recipient(),
            lane: None,
        };
        (seen, sub)
    }

    /// A lane on the thread of sessions with outboxes puts their frames there, not in their
    /// mailboxes, in order; a full outbox cuts its session off and is reported as slow; a
    /// session without an outbox on that thread still gets its frames by mailbox.
    #[actix_rt::test]
    async fn a_lane_fills_the_outboxes_of_its_threads_sessions() {
        let (mut fan, metrics, topic, [l0, _], reported) = with_lanes();
        let (a, sub_a) = outbox_session(1, 8, false);
        let (_, sub_full) = outbox_session(2, 1, true);
        let (c, sub_c) = session(Kind::Reads);
        fan.insert(SessionId(1), on(&l0, sub_a));
        fan.insert(SessionId(2), on(&l0, sub_full));
        fan.insert(SessionId(3), on(&l0, sub_c));
        settle().await;
        for i in 1..=3 {
            fan.send(&frame(&i.to_string()), None, &topic, &metrics);
        }
        settle().await;
        assert_eq!(*a.borrow(), ["outbox 1", "outbox 2", "outbox 3"]);
        assert_eq!(*c.borrow(), ["1", "2", "3"]);
        assert_eq!(*reported.borrow(), [(SessionId(2), true)]);
        assert_eq!(
            metrics
                .outbound_drops
                .with_label_values(&["slow_consumer"])
                .get(),
            1
        );
        assert_eq!(metrics.deliveries.get(), 7);
    }
}
