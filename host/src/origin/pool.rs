//! Origin pools: a member is chosen per request (round-robin, least requests, or a consistent
//! hash of a header or cookie) among those taking requests. A member stops taking them when
//! its active health check fails `unhealthy-threshold` times in a row (and comes back after
//! `healthy-threshold` passes), or when `eject-after` requests in a row got no answer from
//! it (it then stays out for `eject-for`, or until its health check passes). If no member is
//! taking requests, all of them are tried: a pool never refuses on its own say.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::Origin;
use crate::admin::metrics::{Metrics, PoolMemberLabels};
use crate::config::{Balance, HashKey, HealthCheck, OriginTarget, PoolConfig, Probe};

/// One member.
struct Member {
    origin: Arc<Origin>,
    /// The active health check's verdict (true without health checks).
    healthy: AtomicBool,
    /// Out until this many milliseconds after the pool started (passive ejection).
    ejected_until: AtomicU64,
    /// Requests in a row that got no answer.
    failures: AtomicU32,
    in_flight: AtomicUsize,
    requests: Counter,
    gauge: Gauge,
}

/// A pool, ready to take requests; its health checks run while it lives.
pub struct Pool {
    config: PoolConfig,
    members: Vec<Member>,
    next: AtomicUsize,
    started: Instant,
    checks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in &self.checks {
            c.abort();
        }
    }
}

/// A request's claim on a member, counted in its in-flight requests until dropped.
pub struct Claim {
    pool: Arc<Pool>,
    index: usize,
}

impl Claim {
    /// The member's origin.
    pub fn origin(&self) -> &Arc<Origin> {
        &self.pool.members[self.index].origin
    }

    /// Another member for a retry of this claim's request, if the pool has one.
    pub fn another(&self, headers: &HeaderMap) -> Option<Claim> {
        self.pool.claim(headers, Some(self.index))
    }

    /// Records whether the member answered (any response) or not (no connection, no
    /// response head): `eject-after` misses in a row take it out.
    pub fn answered(&self, answered: bool) {
        let m = &self.pool.members[self.index];
        if answered {
            m.failures.store(0, Ordering::Relaxed);
            return;
        }
        let misses = m.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if misses >= self.pool.config.eject_after {
            let until = self.pool.now_ms() + self.pool.config.eject_for.as_millis() as u64;
            m.ejected_until.store(until, Ordering::Relaxed);
            m.failures.store(0, Ordering::Relaxed);
            m.gauge.set(0);
            tracing::warn!(
                pool = %self.pool.config.name,
                member = %m.origin.config().name,
                misses,
                "pool member ejected: requests in a row got no answer"
            );
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.pool.members[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The pool of `config`, whose members are `origins` (in `members` order); starts its
    /// health checks on the current runtime.
    pub fn new(config: PoolConfig, origins: Vec<Arc<Origin>>, metrics: &Metrics) -> Arc<Pool> {
        let members = origins
            .into_iter()
            .map(|origin| {
                let labels = PoolMemberLabels {
                    pool: config.name.clone(),
                    member: origin.config().name.clone(),
                };
                let gauge = metrics.pool_member_healthy.get_or_create(&labels).clone();
                gauge.set(1);
                Member {
                    origin,
                    healthy: AtomicBool::new(true),
                    ejected_until: AtomicU64::new(0),
                    failures: AtomicU32::new(0),
                    in_flight: AtomicUsize::new(0),
                    requests: metrics.pool_member_requests.get_or_create(&labels).clone(),
                    gauge,
                }
            })
            .collect();
        let mut pool = Arc::new(Pool {
            config,
            members,
            next: AtomicUsize::new(0),
            started: Instant::now(),
            checks: Vec::new(),
        });
        if let Some(check) = pool.config.health.clone() {
            let weak = Arc::downgrade(&pool);
            let checks = (0..pool.members.len())
                .map(|i| tokio::spawn(health_loop(weak.clone(), i, check.clone())))
                .collect();
            if let Some(p) = Arc::get_mut(&mut pool) {
                p.checks = checks;
            }
        }
        pool
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn usable(&self, i: usize) -> bool {
        let m = &self.members[i];
        m.healthy.load(Ordering::Relaxed)
            && m.ejected_until.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Chooses a member for a request with `headers`, other than `not` (the member a retry
    /// leaves); `None` only if `not` was the only member.
    pub fn claim(self: &Arc<Self>, headers: &HeaderMap, not: Option<usize>) -> Option<Claim> {
        let n = self.members.len();
        let candidates: Vec<usize> = (0..n).filter(|i| Some(*i) != not).collect();
        if candidates.is_empty() {
            return None;
        }
        let usable: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| self.usable(*i))
            .collect();
        // No member is taking requests: try them all rather than refuse.
        let set = if usable.is_empty() {
            candidates
        } else {
            usable
        };
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let index = match &self.config.balance {
            Balance::RoundRobin => set[turn % set.len()],
            Balance::LeastRequests => {
                let start = turn % set.len();
                (0..set.len())
                    .map(|k| set[(start + k) % set.len()])
                    .min_by_key(|i| self.members[*i].in_flight.load(Ordering::Relaxed))
                    .expect("set is not empty")
            }
            Balance::Hash(key) => match hash_key(key, headers) {
                Some(k) => *set
                    .iter()
                    .max_by_key(|i| {
                        fnv1a(&[
                            k.as_bytes(),
                            self.members[**i].origin.config().name.as_bytes(),
                        ])
                    })
                    .expect("set is not empty"),
                None => set[turn % set.len()],
            },
        };
        let m = &self.members[index];
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        m.requests.inc();
        Some(Claim {
            pool: self.clone(),
            index,
        })
    }
}

/// The value a `hash` pool hashes, if the request has it.
fn hash_key(key: &HashKey, headers: &HeaderMap) -> Option<String> {
    match key {
        HashKey::Header(name) => headers
            .get(name.as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.to_string())
            }),
    }
}

/// FNV-1a over the parts, then a 64-bit finaliser (MurmurHash3's) so that keys differing in
/// their last bytes spread over the whole range: stable across processes and versions, so
/// that every connector of a tunnel sends a key to the same member.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Checks member `i` every `interval` while the pool lives.
async fn health_loop(pool: std::sync::Weak<Pool>, i: usize, check: HealthCheck) {
    let (mut passed, mut failed) = (0u32, 0u32);
    loop {
        tokio::time::sleep(check.interval).await;
        let Some(pool) = pool.upgrade() else { return };
        let m = &pool.members[i];
        let ok = tokio::time::timeout(check.timeout, probe(&m.origin, &check.probe))
            .await
            .unwrap_or(false);
        if ok {
            (passed, failed) = (passed + 1, 0);
        } else {
            (passed, failed) = (0, failed + 1);
        }
        let healthy = m.healthy.load(Ordering::Relaxed);
        if !healthy && passed >= check.healthy_threshold {
            m.healthy.store(true, Ordering::Relaxed);
            m.ejected_until.store(0, Ordering::Relaxed);
            tracing::info!(pool = %pool.config.name, member = %m.origin.config().name, "pool member healthy again");
        } else if healthy && failed >= check.unhealthy_threshold {
            m.healthy.store(false, Ordering::Relaxed);
            tracing::warn!(pool = %pool.config.name, member = %m.origin.config().name, failed, "pool member failed its health checks");
        } else if healthy && ok && m.ejected_until.load(Ordering::Relaxed) > pool.now_ms() {
            // An ejected member whose check passes comes back at once.
            m.ejected_until.store(0, Ordering::Relaxed);
        }
        m.gauge.set(i64::from(pool.usable(i)));
    }
}

/// One health check of `origin`.
async fn probe(origin: &Origin, probe: &Probe) -> bool {
    match probe {
        Probe::Http(path) => {
            let Ok(req) = http::Request::get(path.as_str())
                .header(http::header::HOST, "localhost")
                .body(crate::relay::empty())
            else {
                return false;
            };
            match origin.send(req).await {
                Ok(resp) => resp.status().as_u16() < 500,
                Err(_) => false,
            }
        }
        Probe::Connect => match &origin.config().target {
            OriginTarget::Http(uri) => {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                    Some("https") => 443,
                    _ => 80,
                });
                tokio::net::TcpStream::connect((host, port)).await.is_ok()
            }
            OriginTarget::Unix { path, .. } => tokio::net::UnixStream::connect(path).await.is_ok(),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_key_stays_on_its_member_while_the_others_change() {
        let names = ["a", "b", "c", "d"];
        fn pick<'a>(members: &[&'a str], key: &str) -> &'a str {
            members
                .iter()
                .max_by_key(|m| fnv1a(&[key.as_bytes(), m.as_bytes()]))
                .unwrap()
        }
        let mut moved = 0;
        for k in 0..1000 {
            let key = format!("user-{k}");
            let before = pick(&names, &key);
            let after = pick(&["a", "b", "d"], &key);
            if before != "c" {
                assert_eq!(before, after, "{key} moved though its member stayed");
            } else {
                moved += 1;
            }
        }
        // Only the keys of the member that left moved, about a quarter of them.
        assert!((150..350).contains(&moved), "{moved}");
    }

    #[test]
    fn cookies_and_headers_give_the_key() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=xyz; b=2".parse().unwrap());
        h.insert("x-user", "alice".parse().unwrap());
        assert_eq!(
            hash_key(&HashKey::Cookie("session".into()), &h).as_deref(),
            Some("xyz")
        );
        assert_eq!(
            hash_key(&HashKey::Header("x-user".into()), &h).as_deref(),
            Some("alice")
        );
        assert_eq!(hash_key(&HashKey::Cookie("none".into()), &h), None);
    }
}
