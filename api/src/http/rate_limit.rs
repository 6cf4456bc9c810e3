//! Per-address rate limit for the routes that take no token: the handshake
//! nonce and handshake, `/metrics`, `/healthz` and the dashboard page.
//!
//! Anyone can reach these, so without a limit one client could take all of
//! the server's time for them (and, before nonces were stateless, all of its
//! nonces). Each client address gets a token bucket: `rate` requests a
//! second on average, `burst` at once. A request that finds its bucket
//! empty gets 429 with `Retry-After`, and costs nothing more.
//!
//! Addresses are keyed as the server sees them: IPv4 by address, IPv6 by
//! its /64 (one host usually holds a whole /64, so a key per IPv6 address
//! would let it mint buckets at will). Behind a reverse proxy every client
//! shares the proxy's address; forwarded headers are not trusted, since
//! anyone could send them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Addresses tracked at once. Full buckets are forgotten first (a full
/// bucket is the same as none); when every tracked bucket is in use, new
/// addresses share one overflow bucket, so a flood from more addresses
/// than this costs bounded memory (and slows only new addresses).
const MAX_TRACKED: usize = 65_536;
/// Full buckets are swept at most this often, so a table full of busy
/// addresses is not scanned on every request.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The client's address, as `ConnectInfo` for plain and TLS listeners alike.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, super::HttpsListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, super::HttpsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
    /// Shared by new addresses while `MAX_TRACKED` are in use, and by
    /// requests whose address is unknown.
    Overflow,
}

impl Key {
    fn of(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(v4.octets()),
                None => Key::V6(v6.octets()[..8].try_into().expect("8 bytes")),
            },
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limit on the routes without a token: a token bucket per client
/// address (see the module).
pub struct RateLimit {
    /// Requests per second per address.
    rate: f64,
    /// Requests an address may make at once.
    burst: f64,
    state: Mutex<Buckets>,
}

struct Buckets {
    by_key: HashMap<Key, Bucket>,
    last_sweep: Instant,
}

impl RateLimit {
    /// `None` when `rate` is 0: no limit.
    pub fn new(rate: f64, burst: u32) -> Option<Arc<RateLimit>> {
        (rate > 0.0).then(|| {
            Arc::new(RateLimit {
                rate,
                burst: f64::from(burst.max(1)),
                state: Mutex::new(Buckets {
                    by_key: HashMap::new(),
                    last_sweep: Instant::now(),
                }),
            })
        })
    }

    /// Takes one request from `ip`'s bucket; when it is empty, says how long
    /// until it holds one again.
    pub(crate) fn check(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("rate limit lock");
        let mut key = ip.map(Key::of).unwrap_or(Key::Overflow);
        if !state.by_key.contains_key(&key) && state.by_key.len() >= MAX_TRACKED {
            if now.duration_since(state.last_sweep) >= SWEEP_EVERY {
                state.last_sweep = now;
                let (rate, burst) = (self.rate, self.burst);
                state
                    .by_key
                    .retain(|k, b| *k == Key::Overflow || refilled(b, rate, burst, now) < burst);
            }
            if state.by_key.len() >= MAX_TRACKED {
                key = Key::Overflow;
            }
        }
        let bucket = state.by_key.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, self.rate, self.burst, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

fn refilled(bucket: &Bucket, rate: f64, burst: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// The middleware: 429 with `Retry-After` (whole seconds, at least 1) when
/// the caller's bucket is empty.
pub async fn limit(State(limit): State<Arc<RateLimit>>, request: Request, next: Next) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|ConnectInfo(ClientAddr(addr))| addr.ip());
    match limit.check(ip, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({
                    "error": format!(
                        "too many requests from this address to routes without a token; retry in {secs} s"
                    )
                })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn a_burst_then_the_rate_per_address() {
        let limit = RateLimit::new(20.0, 40).unwrap();
        let start = Instant::now();
        for _ in 0..40 {
            assert!(limit.check(ip("10.0.0.1"), start).is_ok());
        }
        let wait = limit.check(ip("10.0.0.1"), start).unwrap_err();
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        // Another address is not affected.
        assert!(limit.check(ip("10.0.0.2"), start).is_ok());
        // One token back after 1/20 s.
        let later = start + Duration::from_millis(50);
        assert!(limit.check(ip("10.0.0.1"), later).is_ok());
        assert!(limit.check(ip("10.0.0.1"), later).is_err());
    }

    #[test]
    fn ipv6_hosts_are_keyed_by_their_64_and_mapped_v4_as_v4() {
        let limit = RateLimit::new(1.0, 1).unwrap();
        let now = Instant::now();
        assert!(limit.check(ip("2001:db8:1:2::1"), now).is_ok());
        assert!(limit.check(ip("2001:db8:1:2::ffff"), now).is_err());
        assert!(limit.check(ip("2001:db8:1:3::1"), now).is_ok());
        assert!(limit.check(ip("192.0.2.7"), now).is_ok());
        assert!(limit.check(ip("::ffff:192.0.2.7"), now).is_err());
    }

    #[test]
    fn memory_is_bounded_by_the_tracked_addresses() {
        let limit = RateLimit::new(1.0, 2).unwrap();
        let now = Instant::now();
        for n in 0..(MAX_TRACKED as u32 + 1000) {
            let _ = limit.check(Some(IpAddr::from(n.to_be_bytes())), now);
        }
        let tracked = limit.state.lock().unwrap().by_key.len();
        assert!(tracked <= MAX_TRACKED + 1, "{tracked}");
        // Once their buckets are full again, the old addresses are forgotten
        // and new ones get buckets of their own.
        let later = now + Duration::from_secs(5);
        assert!(limit.check(ip("203.0.113.9"), later).is_ok());
        let state = limit.state.lock().unwrap();
        assert!(state.by_key.len() < 10, "{}", state.by_key.len());
    }
}
