//! Pacing of a room's frames: a generic cell rate algorithm (a token bucket kept as one
//! instant). Up to `burst` frames go back to back; past that, one per `interval`.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::DiffPace;

pub struct Pacer {
    interval: Duration,
    /// How far ahead of now the schedule may run and a frame still go at once:
    /// `(burst - 1) × interval`.
    tolerance: Duration,
    /// When the next frame would be due if frames went exactly once per interval; `None`
    /// before the first.
    due: Option<Instant>,
}

impl Pacer {
    pub fn new(pace: DiffPace) -> Pacer {
        let interval = Duration::from_millis(pace.interval_ms);
        Pacer {
            interval,
            tolerance: interval * pace.burst.max(1).saturating_sub(1),
            due: None,
        }
    }

    /// How long a frame must wait from `now` to keep the pace; zero if it may go at once.
    pub fn wait(&self, now: Instant) -> Duration {
        match self.due {
            Some(due) => due
                .saturating_duration_since(now)
                .saturating_sub(self.tolerance),
            None => Duration::ZERO,
        }
    }

    /// Counts a frame sent at `now`. A frame sent ahead of its turn (one that could not wait)
    /// owes at most one interval, so a run of them never holds later frames back for longer.
    pub fn sent(&mut self, now: Instant) {
        if self.interval.is_zero() {
            return;
        }
        let next = self.due.map_or(now, |d| d.max(now)) + self.interval;
        self.due = Some(next.min(now + self.tolerance + self.interval));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pacer(interval_ms: u64, burst: u32) -> Pacer {
        Pacer::new(DiffPace { interval_ms, burst })
    }

    #[test]
    fn a_burst_goes_at_once_then_one_frame_per_interval() {
        let mut p = pacer(100, 3);
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(p.wait(t), Duration::ZERO);
            p.sent(t);
        }
        assert_eq!(p.wait(t), ms(100));
        assert_eq!(p.wait(t + ms(40)), ms(60));
        p.sent(t + ms(100));
        assert_eq!(p.wait(t + ms(100)), ms(100));
    }

    #[test]
    fn a_room_slower_than_the_pace_never_waits() {
        let mut p = pacer(100, 1);
        let t = Instant::now();
        for i in 0..50 {
            let now = t + ms(100 * i);
            assert_eq!(p.wait(now), Duration::ZERO);
            p.sent(now);
        }
    }

    #[test]
    fn the_burst_comes_back_after_a_quiet_spell() {
        let mut p = pacer(100, 4);
        let t = Instant::now();
        for _ in 0..4 {
            p.sent(t);
        }
        assert!(p.wait(t) > Duration::ZERO);
        let later = t + ms(400);
        for _ in 0..4 {
            assert_eq!(p.wait(later), Duration::ZERO);
            p.sent(later);
        }
        assert!(p.wait(later) > Duration::ZERO);
    }

    #[test]
    fn frames_forced_out_of_turn_owe_at_most_one_interval() {
        let mut p = pacer(100, 2);
        let t = Instant::now();
        for _ in 0..1000 {
            p.sent(t);
        }
        assert_eq!(p.wait(t), ms(100));
        assert_eq!(p.wait(t + ms(100)), Duration::ZERO);
    }

    #[test]
    fn an_interval_of_zero_never_waits() {
        let mut p = pacer(0, 1);
        let t = Instant::now();
        for _ in 0..100 {
            p.sent(t);
            assert_eq!(p.wait(t), Duration::ZERO);
        }
    }
}
