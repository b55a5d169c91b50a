//! Presence history as the API serves it: a time series of users and connections online, and
//! the members present at one instant ("time travel"). Pure functions over store rows.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::store::{Interval, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    pub at: i64,
    pub users: i64,
    pub connections: i64,
}

/// Buckets `[from, to)` into steps of `step` ms. In each bucket, each node counts with the
/// largest sample it took in the bucket; a node with no sample in a bucket carries its last
/// value forward while that sample is fresh (`fresh_ms` plus the sample's own resolution),
/// since samples are written on change and as a periodic heartbeat. Nodes add up.
///
/// `samples` must include those shortly before `from` so values carry into the first bucket.
pub fn series(samples: &[Sample], from: i64, to: i64, step: i64, fresh_ms: i64) -> Vec<Point> {
    let step = step.max(1);
    let n = ((to - from + step - 1) / step).max(0) as usize;
    let mut out: Vec<Point> = (0..n)
        .map(|i| Point {
            at: from + i as i64 * step,
            users: 0,
            connections: 0,
        })
        .collect();
    let mut by_node: HashMap<&str, Vec<&Sample>> = HashMap::new();
    for s in samples {
        by_node.entry(&s.node_id).or_default().push(s);
    }
    for (_, mut list) in by_node {
        list.sort_by_key(|s| s.at);
        let mut i = 0;
        let mut last: Option<&Sample> = None;
        for (b, point) in out.iter_mut().enumerate() {
            let start = from + b as i64 * step;
            let end = start + step;
            let mut best: Option<(i64, i64)> = None;
            while i < list.len() && list[i].at < end {
                let s = list[i];
                if s.at >= start {
                    best = Some(match best {
                        Some((u, c)) => (u.max(s.users), c.max(s.connections)),
                        None => (s.users, s.connections),
                    });
                }
                last = Some(s);
                i += 1;
            }
            let value = best.or_else(|| {
                last.filter(|s| start - s.at <= fresh_ms + s.resolution_ms)
                    .map(|s| (s.users, s.connections))
            });
            if let Some((u, c)) = value {
                point.users += u;
                point.connections += c;
            }
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user: String,
    pub sessions: usize,
    /// The earliest join among the user's sessions present at the instant.
    pub since: i64,
}

/// The users present at an instant, from the intervals open then, sorted by user.
pub fn members(intervals: &[Interval]) -> Vec<Member> {
    let mut by_user: BTreeMap<&str, Member> = BTreeMap::new();
    for iv in intervals {
        let m = by_user.entry(&iv.user_id).or_insert_with(|| Member {
            user: iv.user_id.clone(),
            sessions: 0,
            since: iv.joined_at,
        });
        m.sessions += 1;
        m.since = m.since.min(iv.joined_at);
    }
    by_user.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(node: &str, at: i64, users: i64, conns: i64) -> Sample {
        Sample {
            node_id: node.into(),
            account_id: "a".into(),
            room: String::new(),
            at,
            resolution_ms: 1000,
            users,
            connections: conns,
        }
    }

    #[test]
    fn buckets_take_the_largest_sample_and_carry_fresh_values_forward() {
        let samples = vec![s("n1", 900, 1, 1), s("n1", 1500, 3, 4), s("n1", 1700, 2, 2)];
        let pts = series(&samples, 1000, 4000, 1000, 200);
        assert_eq!(
            pts,
            vec![
                Point {
                    at: 1000,
                    users: 3,
                    connections: 4
                },
                // no sample in [2000, 3000): the last one (1700) is fresh enough
                Point {
                    at: 2000,
                    users: 2,
                    connections: 2
                },
                // 3000 - 1700 > fresh + resolution: stale, so nothing is counted
                Point {
                    at: 3000,
                    users: 0,
                    connections: 0
                },
            ]
        );
    }

    #[test]
    fn nodes_add_up_and_a_zero_sample_ends_a_value() {
        let samples = vec![
            s("n1", 1000, 2, 2),
            s("n2", 1100, 5, 6),
            s("n2", 2100, 0, 0),
        ];
        let pts = series(&samples, 1000, 3000, 1000, 5000);
        assert_eq!(
            pts[0],
            Point {
                at: 1000,
                users: 7,
                connections: 8
            }
        );
        assert_eq!(
            pts[1],
            Point {
                at: 2000,
                users: 2,
                connections: 2
            }
        );
    }

    #[test]
    fn an_empty_range_has_no_points() {
        assert!(series(&[], 5, 5, 10, 0).is_empty());
    }

    #[test]
    fn members_group_sessions_by_user() {
        let iv = |u: &str, s: &str, at: i64| Interval {
            id: 0,
            node_id: "n".into(),
            account_id: "a".into(),
            room: String::new(),
            user_id: u.into(),
            session_id: s.into(),
            joined_at: at,
            left_at: None,
        };
        let m = members(&[iv("bob", "s1", 5), iv("alice", "s2", 7), iv("bob", "s3", 3)]);
        assert_eq!(
            m,
            vec![
                Member {
                    user: "alice".into(),
                    sessions: 1,
                    since: 7
                },
                Member {
                    user: "bob".into(),
                    sessions: 2,
                    since: 3
                },
            ]
        );
    }
}
