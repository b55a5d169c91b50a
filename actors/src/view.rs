//! Read views: state that one actor owns and alone writes, which others may read without a
//! trip through its mailbox.
//!
//! Phoenix.Tracker does the same with ETS: `Presence.list/1` reads the table, it never queues
//! behind the tracker's own work. Here a room's members sit behind an `RwLock` that only the
//! room's handlers write (each write lasts one presence operation), and HTTP handlers read it
//! in place. A here-now of a room that is fanning out to 10 000 members is then answered at
//! once, instead of after the fan-out and after every other message in front of it, and the
//! reply needs no second wake of the (busy) HTTP worker.

use std::collections::HashMap;
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

/// A room as the directory names it: `(account, room)`.
type RoomKey = (Arc<str>, Arc<str>);

/// The live rooms' views by `(account, room)`, kept by the registry: inserted when it starts a
/// room, replaced when a room is restarted, removed when the room stops.
#[derive(Clone, Default)]
pub struct RoomDirectory(Arc<RwLock<HashMap<RoomKey, View<Members>>>>);

impl RoomDirectory {
    pub fn get(&self, account: &Arc<str>, room: &Arc<str>) -> Option<View<Members>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(account.clone(), room.clone()))
            .cloned()
    }

    pub(crate) fn insert(&self, account: Arc<str>, room: Arc<str>, view: View<Members>) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((account, room), view);
    }

    pub(crate) fn remove(&self, account: &Arc<str>, room: &Arc<str>) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(account.clone(), room.clone()));
    }
}
