//! Rate limits: per client IP and per account, for login attempts, API requests, socket connects
//! and joins. Each is a keyed GCRA limiter (`governor`): constant memory per key, no background
//! task per key, and an exact "retry after" for the 429's `Retry-After` header.
//!
//! The client IP is the socket's peer address, or — when the peer is one of
//! `server.trusted_proxies` — the right-most address of `X-Forwarded-For` that is not a trusted
//! proxy (the left-most entries are whatever the client chose to send, so they are never used).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use actix_web::HttpRequest;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use presence_actors::Limits;

/// A refusal: which limit, and when the caller may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub scope: &'static str,
    pub retry_after: Duration,
}

impl Throttled {
    /// Whole seconds for `Retry-After`, at least 1.
    pub fn retry_after_s(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// One keyed limiter with its name.
struct Keyed<K: Hash + Eq + Clone> {
    scope: &'static str,
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(scope: &'static str, quota: Quota) -> Keyed<K> {
        Keyed {
            scope,
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    fn check(&self, key: &K) -> Result<(), Throttled> {
        self.limiter.check_key(key).map_err(|not_until| Throttled {
            scope: self.scope,
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

/// `n` per second with a burst of twice that.
fn per_second(n: u32) -> Quota {
    Quota::per_second(nz(n)).allow_burst(nz(n.saturating_mul(2)))
}

/// `n` per minute, all of them at once if need be.
fn per_minute(n: u32) -> Quota {
    Quota::per_minute(nz(n))
}

/// `n` per hour, all of them at once if need be.
fn per_hour(n: u32) -> Quota {
    Quota::with_period(Duration::from_secs(3600) / n.max(1))
        .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
        .allow_burst(nz(n))
}

/// Every rate limit of a node.
pub struct RateLimits {
    login_ip: Keyed<IpAddr>,
    login_email: Keyed<String>,
    api_ip: Keyed<IpAddr>,
    api_account: Keyed<String>,
    connect_ip: Keyed<IpAddr>,
    connect_account: Keyed<String>,
    join_account: Keyed<String>,
    join_ip: Keyed<IpAddr>,
    /// At most one `login_throttled` audit entry per IP per minute, however hard it hammers.
    throttle_audit: Keyed<IpAddr>,
    trusted_proxies: Vec<IpAddr>,
}

impl RateLimits {
    pub fn new(l: &Limits, trusted_proxies: Vec<IpAddr>) -> RateLimits {
        RateLimits {
            login_ip: Keyed::new("login_per_ip", per_minute(l.login_per_ip_per_minute)),
            login_email: Keyed::new("login_per_email", per_hour(l.login_per_email_per_hour)),
            api_ip: Keyed::new("api_per_ip", per_second(l.api_per_ip_per_s)),
            api_account: Keyed::new("api_per_account", per_second(l.api_per_account_per_s)),
            connect_ip: Keyed::new("connects_per_ip", per_second(l.connects_per_ip_per_s)),
            connect_account: Keyed::new(
                "connects_per_account",
                per_second(l.connects_per_account_per_s),
            ),
            join_account: Keyed::new("joins_per_account", per_second(l.joins_per_account_per_s)),
            join_ip: Keyed::new("joins_per_ip", per_second(l.joins_per_ip_per_s)),
            throttle_audit: Keyed::new("audit", per_minute(1)),
            trusted_proxies,
        }
    }

    /// A login attempt: first the client's IP, then (only for attempts the IP limit let
    /// through) the email, so a flood from one address neither gets through nor locks the
    /// account's owner out from elsewhere.
    pub fn login(&self, ip: IpAddr, email: &str) -> Result<(), Throttled> {
        self.login_ip.check(&ip)?;
        self.login_email.check(&email.trim().to_lowercase())
    }

    /// Whether a throttled login from `ip` should be written to the audit log now.
    pub fn audit_throttle(&self, ip: IpAddr) -> bool {
        self.throttle_audit.check(&ip).is_ok()
    }

    pub fn api_ip(&self, ip: IpAddr) -> Result<(), Throttled> {
        self.api_ip.check(&ip)
    }

    /// Per account (or per admin user, keyed `user:<id>`).
    pub fn api_account(&self, key: &str) -> Result<(), Throttled> {
        self.api_account.check(&key.to_string())
    }

    pub fn connect_ip(&self, ip: IpAddr) -> Result<(), Throttled> {
        self.connect_ip.check(&ip)
    }

    pub fn connect_account(&self, account: &str) -> Result<(), Throttled> {
        self.connect_account.check(&account.to_string())
    }

    /// A room join: the client's IP first (if known), then the account.
    pub fn join(&self, ip: Option<IpAddr>, account: &str) -> Result<(), Throttled> {
        if let Some(ip) = ip {
            self.join_ip.check(&ip)?;
        }
        self.join_account.check(&account.to_string())
    }

    /// Forgets keys whose limits have fully recovered (call now and then).
    pub fn sweep(&self) {
        self.login_ip.sweep();
        self.login_email.sweep();
        self.api_ip.sweep();
        self.api_account.sweep();
        self.connect_ip.sweep();
        self.connect_account.sweep();
        self.join_account.sweep();
        self.join_ip.sweep();
        self.throttle_audit.sweep();
    }

    /// The client's address (see the module docs).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        Some(forwarded_client(peer, req, &self.trusted_proxies))
    }
}

fn forwarded_client(peer: IpAddr, req: &HttpRequest, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let mut last = peer;
    let hops = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => last = ip,
            Ok(ip) => return ip,
            // Garbage in the chain: trust nothing beyond it.
            Err(_) => return last,
        }
    }
    last
}

/// Parses `server.trusted_proxies`.
pub fn parse_proxies(list: &[String]) -> Result<Vec<IpAddr>, String> {
    list.iter()
        .map(|s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("'{s}' is not an IP address"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn limits() -> Limits {
        Limits {
            login_per_ip_per_minute: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn logins_from_one_ip_are_throttled_but_another_ip_still_gets_in() {
        let r = RateLimits::new(&limits(), vec![]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut refused = 0;
        for _ in 0..100 {
            if let Err(t) = r.login(a, "x@example.com") {
                assert_eq!(t.scope, "login_per_ip");
                assert!(t.retry_after_s() >= 1);
                refused += 1;
            }
        }
        assert_eq!(refused, 97);
        assert!(r.login(b, "X@example.com ").is_ok());
        // One audit entry per IP per minute.
        assert!(r.audit_throttle(a));
        assert!(!r.audit_throttle(a));
        assert!(r.audit_throttle(b));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let req = TestRequest::default()
            .peer_addr("127.0.0.1:5000".parse().unwrap())
            .insert_header(("x-forwarded-for", "6.6.6.6, 203.0.113.9, 127.0.0.1"))
            .to_http_request();
        assert_eq!(
            forwarded_client(proxy, &req, &[proxy]),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(forwarded_client(proxy, &req, &[]), proxy);
        let bad = TestRequest::default()
            .insert_header(("x-forwarded-for", "not-an-ip"))
            .to_http_request();
        assert_eq!(forwarded_client(proxy, &bad, &[proxy]), proxy);
    }
}
