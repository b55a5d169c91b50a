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
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::room::Members;

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
type AccountRooms = BTreeMap<Arc<str>, View<Members>>;

/// The live rooms' views by account and name, kept by the registry: inserted when it starts a
/// room, replaced when a room is restarted, removed when the room stops.
#[derive(Clone, Default)]
pub struct RoomDirectory(Arc<RwLock<HashMap<Arc<str>, AccountRooms>>>);

impl RoomDirectory {
    pub fn get(&self, account: &str, room: &str) -> Option<View<Members>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)?
            .get(room)
            .cloned()
    }

    /// The account's live rooms, in name order.
    pub fn of_account(&self, account: &str) -> Vec<(Arc<str>, View<Members>)> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .map(|rooms| rooms.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub(crate) fn insert(&self, account: Arc<str>, room: Arc<str>, view: View<Members>) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(account)
            .or_default()
            .insert(room, view);
    }

    pub(crate) fn remove(&self, account: &str, room: &str) {
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(rooms) = map.get_mut(account) {
            rooms.remove(room);
            if rooms.is_empty() {
                map.remove(account);
            }
        }
    }
}
