//! Read views: state that one actor owns and alone writes, which others may read without a
//! trip through its mailbox.
//!
//! Phoenix.Tracker does the same with ETS: `Presence.list/1` reads the table, it never queues
//! behind the tracker's own work. Here a room's members sit behind an `RwLock` that only the
//! room's handlers write (each write lasts one presence operation), and HTTP handlers read it
//! in place. A here-now of a room that is fanning out to 10 000 members is then answered at
//! once, instead of after the fan-out and after every other message in front of it, and the
//! reply needs no second wake of the (busy) HTTP worker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use actix::Addr;

use crate::room::{Members, RoomActor};

pub struct View<T>(Arc<RwLock<T>>);

impl<T> View<T> {
    pub fn new(value: T) -> View<T> {
        View(Arc::new(RwLock::new(value)))
    }

    /// Shared access. A writer that panicked (a crashing actor) leaves the last state it
    /// wrote, which is what readers get until the actor's next generation replaces the view.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// For the owning actor only.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Clone for View<T> {
    fn clone(&self) -> View<T> {
        View(self.0.clone())
    }
}

/// The rooms of one account by name, in name order.
type AccountRooms = BTreeMap<Arc<str>, Listed>;

/// A live room as the directory lists it: its members' view and its address.
struct Listed {
    members: View<Members>,
    addr: Addr<RoomActor>,
}

/// The live rooms by account and name, kept by the registry: inserted when it starts a room,
/// replaced when a room is restarted, removed when the room stops.
///
/// Readers outside the tree use it without a trip through the registry's mailbox: HTTP reads a
/// room's members (here-now), and a session joining a room that is already live finds its
/// address here (`live_room`) instead of asking the registry, which would cost the join two
/// cross-thread hops (to the registry and back) before it reaches the room. Starting a room,
/// its limits and its supervision stay the registry's: a room that is not listed, or no longer
/// running, is resolved through the registry as before.
#[derive(Clone, Default)]
pub struct RoomDirectory(Arc<Directory>);

#[derive(Default)]
struct Directory {
    rooms: RwLock<HashMap<Arc<str>, AccountRooms>>,
    /// Set when the node shuts down: joins then go to the registry, which refuses them.
    closed: AtomicBool,
}

impl RoomDirectory {
    fn rooms(&self) -> RwLockReadGuard<'_, HashMap<Arc<str>, AccountRooms>> {
        self.0.rooms.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn rooms_mut(&self) -> RwLockWriteGuard<'_, HashMap<Arc<str>, AccountRooms>> {
        self.0.rooms.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, account: &str, room: &str) -> Option<View<Members>> {
        self.rooms()
            .get(account)?
            .get(room)
            .map(|l| l.members.clone())
    }

    /// The room's actor if it is listed and running, and the node is not shutting down.
    pub fn live_room(&self, account: &str, room: &str) -> Option<Addr<RoomActor>> {
        if self.0.closed.load(Ordering::Acquire) {
            return None;
        }
        self.rooms()
            .get(account)?
            .get(room)
            .map(|l| l.addr.clone())
            .filter(Addr::connected)
    }

    /// The account's live rooms, in name order.
    pub fn of_account(&self, account: &str) -> Vec<(Arc<str>, View<Members>)> {
        self.rooms()
            .get(account)
            .map(|rooms| {
                rooms
                    .iter()
                    .map(|(k, l)| (k.clone(), l.members.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn insert(
        &self,
        account: Arc<str>,
        room: Arc<str>,
        members: View<Members>,
        addr: Addr<RoomActor>,
    ) {
        self.rooms_mut()
            .entry(account)
            .or_default()
            .insert(room, Listed { members, addr });
    }

    pub(crate) fn remove(&self, account: &str, room: &str) {
        let mut map = self.rooms_mut();
        if let Some(rooms) = map.get_mut(account) {
            rooms.remove(room);
            if rooms.is_empty() {
                map.remove(account);
            }
        }
    }

    /// No more joins through the directory (the node is shutting down).
    pub(crate) fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }
}
