//! The edge's tunnel registry: hostnames → tunnels, and each tunnel's live connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{HostPattern, TunnelConfig};
use crate::proto::HeadCodec;

/// One registered connector connection.
#[derive(Debug)]
pub struct ConnEntry {
    /// Edge-assigned id.
    pub id: u64,
    /// The connector's name, for logs.
    pub connector_id: String,
    /// Which of the connector's connections to this edge it is.
    pub conn_index: u32,
    /// The connection, over QUIC or HTTP/2.
    pub conn: crate::transport::Connection,
    /// What the connector said it runs (`sluice/0.1.0`), if it said.
    pub software: Option<String>,
    /// How the heads of its request streams are encoded (agreed at registration).
    pub heads: HeadCodec,
    /// The connector serves session streams (public TCP and UDP ports).
    pub sessions: bool,
    /// The connector reads framed bodies with trailers (gRPC).
    pub trailers: bool,
    /// Its UDP flows' QUIC datagrams (sessions over QUIC only).
    pub flows: Option<Arc<crate::services::udp::FlowRouter>>,
    /// When it registered.
    pub registered_at: std::time::SystemTime,
    /// Digest of the connector's ingress rules and plugins, updated when it reloads.
    digest: Mutex<Option<String>>,
    /// Hash of the token it registered with (a changed token revokes the connection).
    token_sha256: [u8; 32],
    in_flight: AtomicUsize,
    draining: AtomicBool,
    /// Woken when `in_flight` drops to zero.
    idle: tokio::sync::Notify,
}

impl ConnEntry {
    /// The transport the connection runs on: `quic` or `http2`.
    pub fn protocol(&self) -> &'static str {
        self.conn.protocol().as_str()
    }

    /// Streams currently open on this connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks the connection as draining: no new streams are routed to it. Use
    /// [`Registry::drain`], which orders this with [`Registry::pick`].
    fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the connection is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Waits until no stream is in flight on this connection. Cancel safe.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether new streams may go to the connection: it is not draining.
    ///
    /// Whether it is closed is not asked here: a closed connection leaves the registry as soon
    /// as its acceptor sees the close (its control stream fails with it, or has ended and the
    /// acceptor waits for the close). A request's stream opened in between fails at once and
    /// is retried on another connection; a session's fails as it would had the connection
    /// closed a moment later. Asking would take the connection's lock once per connection and
    /// request, against its driver: that was a third of the edge's lock waits under load.
    fn usable(&self) -> bool {
        !self.is_draining()
    }

    /// The connector's current ingress digest.
    pub fn digest(&self) -> Option<String> {
        self.digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a new ingress digest (the connector reloaded).
    pub fn set_digest(&self, digest: String) {
        *self.digest.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
    }
}

/// What a registration says about the connection being added.
#[derive(Debug)]
pub struct Registrant {
    /// Hash of the token it registered with.
    pub token_sha256: [u8; 32],
    /// The connector's name.
    pub connector_id: String,
    /// Which of its connections to this edge this is.
    pub conn_index: u32,
    /// The connector's software and version.
    pub software: Option<String>,
    /// The connector's ingress digest.
    pub digest: Option<String>,
    /// The head encoding agreed with it.
    pub heads: HeadCodec,
    /// It serves session streams.
    pub sessions: bool,
    /// It reads framed bodies with trailers.
    pub trailers: bool,
    /// The connection, over QUIC or HTTP/2.
    pub conn: crate::transport::Connection,
}

/// One registered connection, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnStatus {
    /// Edge-assigned id.
    pub id: u64,
    /// The connector's name.
    pub connector: String,
    /// Its software and version, if it said.
    pub software: Option<String>,
    /// `quic` or `http2`.
    pub protocol: &'static str,
    /// The connector's address as the edge sees it.
    pub peer: String,
    /// Seconds since it registered.
    pub registered_secs: u64,
    /// Requests in flight on it.
    pub in_flight: usize,
    /// Whether it is draining.
    pub draining: bool,
    /// Which of the tunnel's tokens it registered with (0 = the first listed): after a
    /// rotation, connections still on the old token show its position.
    pub token: Option<usize>,
    /// Its ingress digest.
    pub digest: Option<String>,
}

/// Connections by ingress digest; connectors that send none (older versions) are left out,
/// so that they never count as disagreeing.
fn count_digests(list: &[Arc<ConnEntry>]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for digest in list.iter().filter_map(|c| c.digest()) {
        *out.entry(digest).or_default() += 1;
    }
    out
}

/// One tunnel, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TunnelStatus {
    /// Tunnel id.
    pub id: String,
    /// Its hostnames.
    pub hostnames: Vec<String>,
    /// Requests in flight.
    pub in_flight: usize,
    /// Registered connections by digest (those of connectors that send none left out): more
    /// than one key means replicas disagree.
    pub digests: std::collections::BTreeMap<String, usize>,
    /// Registered connections.
    pub connections: Vec<ConnStatus>,
}

/// Why a registered connection was not added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// The tunnel is gone or its token changed since the registration was checked.
    #[error("the tunnel was removed or its token changed")]
    Revoked,
    /// The tunnel has this many connections already.
    #[error("the tunnel already has its maximum of {0} connections")]
    Full(usize),
}

/// Counts a stream as in flight on a connection until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<ConnEntry>);

impl InFlight {
    /// The connection the stream runs on.
    pub fn conn(&self) -> &Arc<ConnEntry> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Counts a request against its tunnel's `max-concurrent-requests` until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The maps a request looks its host and tunnel up in, four times per request: hashed with
/// foldhash, seeded per process, rather than SipHash, which made them about 700 instructions
/// of an edge's 55,000 per request. Only configuration and registrations insert into them; a
/// client's host is only looked up.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Hostname routing, rebuilt as a whole when the configuration changes.
#[derive(Debug, Default)]
struct Routes {
    tunnels: Map<String, TunnelConfig>,
    /// Requests in flight per tunnel; kept across reloads for tunnels that stay.
    active: Map<String, Arc<AtomicUsize>>,
    /// Tunnel ids by hostname: shared, so that a request takes its tunnel's id without a copy.
    exact: Map<String, Arc<str>>,
    /// (suffix, tunnel id), longest suffix first.
    wildcards: Vec<(String, Arc<str>)>,
}

impl Routes {
    /// The tunnel serving `host`: exact names first, then the most specific wildcard.
    fn tunnel_for_host(&self, host: &str) -> Option<&Arc<str>> {
        if let Some(id) = self.exact.get(host) {
            return Some(id);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, id)| id)
    }

    /// Admits one more request for `tunnel` unless it is at its limit (the error).
    fn admit(&self, tunnel: &str) -> Result<Admitted, usize> {
        let limit = self
            .tunnels
            .get(tunnel)
            .map_or(0, |t| t.max_concurrent_requests);
        let Some(counter) = self.active.get(tunnel) else {
            return Err(limit);
        };
        let mut current = counter.load(Ordering::Acquire);
        loop {
            if current >= limit {
                return Err(limit);
            }
            match counter.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Admitted(counter.clone())),
                Err(now) => current = now,
            }
        }
    }
}

/// Tunnels, their hostnames and their connections.
#[derive(Debug, Default)]
pub struct Registry {
    routes: RwLock<Routes>,
    conns: Mutex<Map<String, Vec<Arc<ConnEntry>>>>,
    next_id: AtomicU64,
    rotation: AtomicUsize,
}

impl Registry {
    /// A registry serving `tunnels`.
    pub fn new(tunnels: &[TunnelConfig]) -> Self {
        let reg = Registry::default();
        reg.set_tunnels(tunnels);
        reg
    }

    /// Replaces the set of tunnels and hostnames atomically. Connections of tunnels that stay,
    /// with the same token, are kept; connections of removed tunnels, or registered with a
    /// token that is no longer valid, are returned so that they can be closed.
    pub fn set_tunnels(&self, tunnels: &[TunnelConfig]) -> Vec<Arc<ConnEntry>> {
        let mut routes = Routes::default();
        for t in tunnels {
            let id: Arc<str> = t.id.as_str().into();
            for h in &t.hostnames {
                match h {
                    HostPattern::Exact(name) => {
                        routes.exact.insert(name.clone(), id.clone());
                    }
                    HostPattern::Wildcard(suffix) => {
                        routes.wildcards.push((suffix.clone(), id.clone()))
                    }
                }
            }
            routes.tunnels.insert(t.id.clone(), t.clone());
        }
        routes
            .wildcards
            .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        let mut guard = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for id in routes.tunnels.keys() {
            let counter = guard.active.get(id).cloned().unwrap_or_default();
            routes.active.insert(id.clone(), counter);
        }
        *guard = routes;
        let valid = |tunnel: &str, hash: &[u8; 32]| {
            guard
                .tunnels
                .get(tunnel)
                .is_some_and(|t| t.accepts_hash(hash))
        };
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut revoked = Vec::new();
        for (tunnel, list) in conns.iter_mut() {
            list.retain(|c| {
                let keep = valid(tunnel, &c.token_sha256);
                if !keep {
                    revoked.push(c.clone());
                }
                keep
            });
        }
        conns.retain(|_, l| !l.is_empty());
        revoked
    }

    /// The tunnel serving `host` (lowercase, no port) — exact names first, then the most
    /// specific wildcard — with one more request admitted to it unless it is at its limit
    /// (given as the error). One read of the routes for both.
    pub fn route(&self, host: &str) -> Option<(Arc<str>, Result<Admitted, usize>)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let tunnel = routes.tunnel_for_host(host)?;
        Some((tunnel.clone(), routes.admit(tunnel)))
    }

    /// The tunnel serving `host`.
    #[cfg(test)]
    pub fn tunnel_for_host(&self, host: &str) -> Option<Arc<str>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.tunnel_for_host(host).cloned()
    }

    /// The configuration of a tunnel.
    pub fn tunnel(&self, id: &str) -> Option<TunnelConfig> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.tunnels.get(id).cloned()
    }

    /// A fresh connection id.
    pub fn allocate_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a registered connection under an id from [`Registry::allocate_id`], unless its
    /// token is no longer the tunnel's (a reload rotated it while the registration was in
    /// flight) or the tunnel already has `max-connections` connections.
    ///
    /// The check and the insertion happen under the routes lock that [`Registry::set_tunnels`]
    /// holds while it revokes, so a registration is either revoked by a reload or sees it.
    pub fn add(
        &self,
        tunnel: &str,
        id: u64,
        registrant: Registrant,
    ) -> Result<Arc<ConnEntry>, AddError> {
        let Registrant {
            token_sha256,
            connector_id,
            conn_index,
            software,
            digest,
            heads,
            sessions,
            trailers,
            conn,
        } = registrant;
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let config = routes
            .tunnels
            .get(tunnel)
            .filter(|t| t.accepts_hash(&token_sha256))
            .ok_or(AddError::Revoked)?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(tunnel.to_string()).or_default();
        // `max-connections` counts slots (connector, connection index), draining connections
        // aside: a replacement registers in its slot before the connection it replaces
        // drains (a token rotation), so a slot may hold two — never more.
        let same_slot = |c: &&Arc<ConnEntry>| {
            c.usable() && c.connector_id == connector_id && c.conn_index == conn_index
        };
        let in_slot = list.iter().filter(same_slot).count();
        let slots: std::collections::HashSet<(&str, u32)> = list
            .iter()
            .filter(|c| c.usable())
            .map(|c| (c.connector_id.as_str(), c.conn_index))
            .collect();
        // Draining connections count against twice the limit, so that a connector cannot pile
        // them up by draining and registering again.
        if in_slot >= 2
            || (in_slot == 0 && slots.len() >= config.max_connections)
            || list.len() >= 2 * config.max_connections
        {
            return Err(AddError::Full(config.max_connections));
        }
        let flows = sessions
            .then(|| crate::services::udp::FlowRouter::start(&conn))
            .flatten();
        let entry = Arc::new(ConnEntry {
            id,
            token_sha256,
            connector_id,
            conn_index,
            conn,
            software,
            heads,
            sessions,
            trailers,
            flows,
            registered_at: std::time::SystemTime::now(),
            digest: Mutex::new(digest),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
        });
        list.push(entry.clone());
        Ok(entry)
    }

    /// Marks `entry` as draining. Taken under the lock `pick` holds from choosing a connection
    /// to counting the stream against it, so once this returns every stream routed to the
    /// connection is counted in its `in_flight` and no other will be.
    pub fn drain(&self, entry: &ConnEntry) {
        let _conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        entry.set_draining();
    }

    /// Removes a connection (when it closes).
    pub fn remove(&self, tunnel: &str, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = conns.get_mut(tunnel) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(tunnel);
            }
        }
    }

    /// Picks the usable connection of `tunnel` with the fewest streams in flight, skipping
    /// connections in `exclude`, and counts the new stream against it.
    pub fn pick(&self, tunnel: &str, exclude: &[u64]) -> Option<InFlight> {
        self.pick_where(tunnel, |c| !exclude.contains(&c.id))
    }

    /// As [`Registry::pick`], among the connections of `tunnel` that serve session streams,
    /// skipping those of the connectors in `skip`.
    pub fn pick_for_session(&self, tunnel: &str, skip: &[String]) -> Option<InFlight> {
        self.pick_where(tunnel, |c| c.sessions && !skip.contains(&c.connector_id))
    }

    fn pick_where(&self, tunnel: &str, eligible: impl Fn(&ConnEntry) -> bool) -> Option<InFlight> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get(tunnel)?;
        // Ties are broken by rotating the starting point, so idle connections share the load.
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let best = (0..list.len())
            .map(|i| &list[(start + i) % list.len()])
            .filter(|c| c.usable() && eligible(c))
            .min_by_key(|c| c.in_flight())?
            .clone();
        best.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight(best))
    }

    /// Number of registered, non-draining connections of `tunnel`.
    pub fn live_connections(&self, tunnel: &str) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .get(tunnel)
            .map_or(0, |l| l.iter().filter(|c| c.usable()).count())
    }

    /// Registered connections of `tunnel` by ingress digest (connectors that send none are
    /// left out). More than one key: its replicas disagree.
    pub fn digests(&self, tunnel: &str) -> std::collections::BTreeMap<String, usize> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        count_digests(conns.get(tunnel).map(Vec::as_slice).unwrap_or_default())
    }

    /// Every configured tunnel with its connections, ordered by tunnel id.
    pub fn status(&self) -> Vec<TunnelStatus> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<TunnelStatus> = routes
            .tunnels
            .values()
            .map(|t| {
                let list = conns.get(&t.id).map(Vec::as_slice).unwrap_or_default();
                let connections = list
                    .iter()
                    .map(|c| {
                        let digest = c.digest();
                        ConnStatus {
                            id: c.id,
                            connector: c.connector_id.clone(),
                            software: c.software.clone(),
                            protocol: c.protocol(),
                            peer: c.conn.remote_address().to_string(),
                            registered_secs: c.registered_at.elapsed().map_or(0, |d| d.as_secs()),
                            in_flight: c.in_flight(),
                            draining: c.is_draining(),
                            token: t.token_hashes.iter().position(|h| h == &c.token_sha256),
                            digest,
                        }
                    })
                    .collect();
                TunnelStatus {
                    digests: count_digests(list),
                    id: t.id.clone(),
                    hostnames: t.hostnames.iter().map(|h| h.to_string()).collect(),
                    in_flight: routes
                        .active
                        .get(&t.id)
                        .map_or(0, |a| a.load(Ordering::Relaxed)),
                    connections,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every registered connection, all tunnels together.
    pub fn all_connections(&self) -> Vec<Arc<ConnEntry>> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.values().flatten().cloned().collect()
    }

    /// Number of registered connections, all tunnels together.
    pub fn total_connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(id: &str, hosts: &[&str]) -> TunnelConfig {
        TunnelConfig {
            id: id.into(),
            token_hashes: vec![[0; 32]],
            hostnames: hosts
                .iter()
                .map(|h| HostPattern::try_from(*h).unwrap())
                .collect(),
            max_concurrent_requests: 10,
            max_connections: 2,
            ports: Vec::new(),
        }
    }

    #[test]
    fn host_lookup_prefers_exact_then_longest_wildcard() {
        let reg = Registry::new(&[
            tunnel("a", &["*.example.com", "www.example.com"]),
            tunnel("b", &["*.api.example.com"]),
            tunnel("c", &["api.example.com"]),
        ]);
        assert_eq!(reg.tunnel_for_host("www.example.com").as_deref(), Some("a"));
        assert_eq!(reg.tunnel_for_host("x.example.com").as_deref(), Some("a"));
        assert_eq!(
            reg.tunnel_for_host("v1.api.example.com").as_deref(),
            Some("b")
        );
        assert_eq!(reg.tunnel_for_host("api.example.com").as_deref(), Some("c"));
        assert_eq!(reg.tunnel_for_host("example.com"), None);
        assert_eq!(reg.tunnel_for_host("other.org"), None);
    }

    #[test]
    fn reload_swaps_hostnames() {
        let reg = Registry::new(&[tunnel("a", &["a.test"]), tunnel("b", &["b.test"])]);
        let revoked = reg.set_tunnels(&[tunnel("a", &["a.test", "a2.test"])]);
        assert!(revoked.is_empty());
        assert_eq!(reg.tunnel_for_host("a2.test").as_deref(), Some("a"));
        assert_eq!(reg.tunnel_for_host("b.test"), None);
    }

    #[test]
    fn admission_is_bounded_and_released() {
        let reg = Registry::new(&[tunnel("a", &["a.test", "*.a.test"])]);
        let admit = |host| {
            let (tunnel, admitted) = reg.route(host).expect("a.test is routed");
            assert_eq!(&*tunnel, "a");
            admitted
        };
        // Exact and wildcard hostnames count against the same tunnel.
        let held: Vec<_> = (0..10)
            .map(|i| admit(if i % 2 == 0 { "a.test" } else { "x.a.test" }).unwrap())
            .collect();
        assert_eq!(admit("a.test").unwrap_err(), 10);
        drop(held);
        assert!(admit("x.a.test").is_ok());
        assert!(reg.route("nope.test").is_none());
    }

    fn registrant(token_sha256: [u8; 32], conn: &crate::transport::Connection) -> Registrant {
        Registrant {
            token_sha256,
            connector_id: "c".into(),
            conn_index: 0,
            software: None,
            digest: None,
            heads: HeadCodec::Json,
            sessions: false,
            trailers: false,
            conn: conn.clone(),
        }
    }

    /// A real QUIC connection on loopback, for registry entries (never used for traffic).
    async fn dummy_conn() -> (
        crate::transport::testing::Loopback,
        (),
        crate::transport::Connection,
    ) {
        let pair = crate::transport::testing::pair(crate::transport::Protocol::Quic).await;
        let conn = pair.edge.clone();
        (pair, (), conn)
    }

    #[tokio::test]
    async fn a_registration_checked_before_a_token_rotation_is_refused_after_it() {
        let (_server, _client, conn) = dummy_conn().await;
        let old = tunnel("a", &["a.test"]);
        let reg = Registry::new(std::slice::from_ref(&old));
        // The registration was authorised against `old`; a reload rotates the token before
        // the registry entry is added.
        let mut rotated = old.clone();
        rotated.token_hashes = vec![[1; 32]];
        reg.set_tunnels(&[rotated]);
        let added = reg.add("a", 1, registrant(old.token_hashes[0], &conn));
        assert_eq!(added.unwrap_err(), AddError::Revoked);
        assert_eq!(reg.total_connections(), 0);
        let added = reg.add("gone", 2, registrant(old.token_hashes[0], &conn));
        assert_eq!(added.unwrap_err(), AddError::Revoked);
    }

    #[tokio::test]
    async fn a_tunnel_takes_at_most_max_connections() {
        let (_server, _client, conn) = dummy_conn().await;
        let t = tunnel("a", &["a.test"]);
        let hash = t.token_hashes[0];
        let reg = Registry::new(std::slice::from_ref(&t));
        let slot = |index: u32| Registrant {
            conn_index: index,
            ..registrant(hash, &conn)
        };
        reg.add("a", 1, slot(0)).unwrap();
        let second = reg.add("a", 2, slot(1)).unwrap();
        assert_eq!(reg.add("a", 3, slot(2)).unwrap_err(), AddError::Full(2));
        // A replacement registers in its slot before the connection it replaces drains…
        reg.add("a", 4, slot(0)).unwrap();
        // …but a slot never holds more than two.
        assert_eq!(reg.add("a", 5, slot(0)).unwrap_err(), AddError::Full(2));
        reg.remove("a", 1);
        assert_eq!(reg.add("a", 6, slot(2)).unwrap_err(), AddError::Full(2));
        // A draining connection makes room, up to twice the limit in all.
        reg.drain(&second);
        let third = reg.add("a", 7, slot(2)).unwrap();
        reg.drain(&third);
        let fourth = reg.add("a", 8, slot(3)).unwrap();
        reg.drain(&fourth);
        assert_eq!(reg.add("a", 9, slot(4)).unwrap_err(), AddError::Full(2));
    }
}
