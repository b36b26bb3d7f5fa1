//! The plugins' key-value store (the `kv` import, with the `kv` grant): one namespace per
//! plugin name, held by the [`super::Runtime`] and so kept across reloads.
//!
//! Two backends. In this process (the default): bounded by the operator's quotas; expired
//! keys are dropped when read, and swept when a write would otherwise pass a quota. In Redis
//! (`[kv] redis`): connectors given the same Redis share the namespaces, under
//! `sluice:kv:{tunnel}:{plugin}:`; compare-and-swap and increment run as Lua scripts, so they
//! are atomic across connectors. There the key and value sizes are checked, but the
//! namespace's key count and total size are not counted (Redis's own `maxmemory` bounds
//! them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::KvQuota;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 512;

/// Why a key-value operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A write would pass a quota.
    #[error("{0}")]
    Quota(String),
    /// The store could not do it.
    #[error("{0}")]
    Backend(String),
}

/// Every plugin's namespace.
#[derive(Default)]
pub struct KvStore {
    spaces: Mutex<HashMap<String, Arc<Mutex<Space>>>>,
    /// The Redis backend, when configured: its URL, the key prefix, the connection.
    redis: Mutex<Option<Redis>>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvStore")
    }
}

#[derive(Clone)]
struct Redis {
    url: String,
    prefix: String,
    conn: redis::aio::ConnectionManager,
}

/// How long a Redis connection attempt, and then each command, may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl KvStore {
    /// Uses Redis at `url` (keys prefixed for `tunnel`), or this process with `None`. Called
    /// for every configuration, reloads included: the connection is kept while the URL
    /// stays. Connects lazily; must run inside the async runtime.
    pub fn configure(&self, url: Option<&str>, tunnel: &str) -> Result<(), String> {
        let mut redis = self.redis.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("sluice:kv:{tunnel}:");
        match url {
            None => *redis = None,
            Some(url)
                if redis
                    .as_ref()
                    .is_some_and(|r| r.url == url && r.prefix == prefix) => {}
            Some(url) => {
                let client = redis::Client::open(url).map_err(|e| e.to_string())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(2);
                let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| e.to_string())?;
                *redis = Some(Redis {
                    url: url.to_string(),
                    prefix,
                    conn,
                });
            }
        }
        Ok(())
    }

    /// Plugin `name`'s namespace under `quota` (the same one for every instance and reload
    /// of the plugin).
    pub fn access(&self, name: &str, quota: KvQuota) -> KvAccess {
        if let Some(r) = self
            .redis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return KvAccess::Redis {
                conn: r.conn.clone(),
                prefix: format!("{}{name}:", r.prefix),
                quota,
            };
        }
        let space = self
            .spaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        KvAccess::Memory { space, quota }
    }
}

/// One plugin's namespace in this process.
#[derive(Debug, Default)]
pub struct Space {
    entries: HashMap<String, Entry>,
    /// Keys and values together.
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

impl Space {
    fn get(&mut self, key: &str, now: Instant) -> Option<&Entry> {
        if self.entries.get(key).is_some_and(|e| !e.live(now)) {
            self.remove(key);
        }
        self.entries.get(key)
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.bytes -= key.len() + e.value.len();
                true
            }
            None => false,
        }
    }

    fn sweep(&mut self, now: Instant) {
        let dead: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dead {
            self.remove(&k);
        }
    }

    /// Stores `value` under `key` if the quota allows it (sweeping expired keys first when
    /// it would not); nothing changes otherwise.
    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expires: Option<Instant>,
        quota: KvQuota,
        now: Instant,
    ) -> Result<(), KvError> {
        let fits = |s: &Space| {
            let old = s.entries.get(key).map(|e| key.len() + e.value.len());
            let keys = s.entries.len() + usize::from(old.is_none());
            let bytes = s.bytes - old.unwrap_or(0) + key.len() + value.len();
            (keys, bytes)
        };
        let (mut keys, mut bytes) = fits(self);
        if keys > quota.max_keys || bytes > quota.max_bytes {
            self.sweep(now);
            (keys, bytes) = fits(self);
        }
        if keys > quota.max_keys {
            return Err(KvError::Quota(format!(
                "the namespace holds its {} keys (kv-max-keys)",
                quota.max_keys
            )));
        }
        if bytes > quota.max_bytes {
            return Err(KvError::Quota(format!(
                "the namespace would hold {bytes} bytes; kv-max-bytes is {}",
                quota.max_bytes
            )));
        }
        self.remove(key);
        self.bytes += key.len() + value.len();
        self.entries
            .insert(key.to_string(), Entry { value, expires });
        Ok(())
    }
}

/// One plugin's namespace and quota.
#[derive(Clone)]
pub enum KvAccess {
    /// In this process.
    Memory {
        /// The namespace.
        space: Arc<Mutex<Space>>,
        /// Its bounds.
        quota: KvQuota,
    },
    /// In Redis, under `prefix`.
    Redis {
        /// The shared connection.
        conn: redis::aio::ConnectionManager,
        /// `sluice:kv:{tunnel}:{plugin}:`.
        prefix: String,
        /// Its bounds (the value size is checked against `max_bytes`).
        quota: KvQuota,
    },
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.len() > MAX_KEY {
        return Err(KvError::Quota(format!(
            "a key of {} bytes; the limit is {MAX_KEY}",
            key.len()
        )));
    }
    Ok(())
}

fn expiry(now: Instant, ttl_ms: Option<u64>) -> Option<Instant> {
    ttl_ms.map(|ms| now + Duration::from_millis(ms.min(100 * 365 * 86_400_000)))
}

impl KvAccess {
    /// Every live key and its value, sorted by key; in this process only (a Redis namespace
    /// lists nothing: `sluice plugin test` uses the in-process store).
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        let KvAccess::Memory { space, .. } = self else {
            return Vec::new();
        };
        let now = Instant::now();
        let space = space.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = space
            .entries
            .iter()
            .filter(|(_, e)| e.live(now))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect();
        all.sort();
        all
    }
}

/// The in-process backend's operations.
struct MemoryAccess<'a>(&'a Mutex<Space>, KvQuota);

impl MemoryAccess<'_> {
    fn space(&self) -> std::sync::MutexGuard<'_, Space> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        Ok(self
            .space()
            .get(key, Instant::now())
            .map(|e| e.value.clone()))
    }

    /// Sets `key`, expiring after `ttl_ms` if given.
    pub fn set(&self, key: &str, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        check_key(key)?;
        let now = Instant::now();
        self.space()
            .put(key, value, expiry(now, ttl_ms), self.1, now)
    }

    /// Removes `key`; whether it was there (and live).
    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        let mut space = self.space();
        let live = space.get(key, Instant::now()).is_some();
        space.remove(key);
        Ok(live)
    }

    /// Sets `key` to `new` if its live value is `expected` (`None`: absent).
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        check_key(key)?;
        let now = Instant::now();
        let mut space = self.space();
        let current = space.get(key, now).map(|e| e.value.as_slice());
        if current != expected {
            return Ok(false);
        }
        space.put(key, new, expiry(now, ttl_ms), self.1, now)?;
        Ok(true)
    }

    /// Adds `delta` to the decimal integer at `key` (0 when absent); the new value.
    pub fn increment(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, KvError> {
        check_key(key)?;
        let now = Instant::now();
        let mut space = self.space();
        let (current, expires) = match space.get(key, now) {
            Some(e) => {
                let n = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
                    .ok_or_else(|| {
                        KvError::Backend(format!("the value of {key:?} is not an integer"))
                    })?;
                (n, e.expires)
            }
            None => (0, expiry(now, ttl_ms)),
        };
        let sum = current
            .checked_add(delta)
            .ok_or_else(|| KvError::Backend(format!("incrementing {key:?} overflows")))?;
        space.put(key, sum.to_string().into_bytes(), expires, self.1, now)?;
        Ok(sum)
    }
}

/// Sets a key to ARGV[3] if it holds ARGV[2] (ARGV[1] = "1") or is absent (ARGV[1] = "0");
/// ARGV[4] is a time to live in ms, or empty.
const CAS: &str = r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[3])
end
return 1
"#;

/// Adds ARGV[1] to a key; a key it creates expires after ARGV[2] ms (if not empty).
const INCREMENT: &str = r#"
local existed = redis.call('EXISTS', KEYS[1])
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"#;

/// The two scripts, hashed once (Redis runs them by hash, loading them on first use).
static CAS_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CAS));
static INCREMENT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(INCREMENT));

fn backend(e: redis::RedisError) -> KvError {
    KvError::Backend(format!("redis: {e}"))
}

fn ttl_arg(ttl_ms: Option<u64>) -> String {
    ttl_ms.map(|ms| ms.max(1).to_string()).unwrap_or_default()
}

impl KvAccess {
    fn value_fits(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        let KvAccess::Redis { quota, .. } = self else {
            return Ok(());
        };
        if key.len() + value.len() > quota.max_bytes {
            return Err(KvError::Quota(format!(
                "a value of {} bytes; kv-max-bytes is {}",
                value.len(),
                quota.max_bytes
            )));
        }
        Ok(())
    }

    /// The live value of `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self {
            KvAccess::Memory { space, quota } => MemoryAccess(space, *quota).get(key),
            KvAccess::Redis { conn, prefix, .. } => {
                check_key(key)?;
                redis::cmd("GET")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(backend)
            }
        }
    }

    /// Sets `key`, expiring after `ttl_ms` if given.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        match self {
            KvAccess::Memory { space, quota } => {
                MemoryAccess(space, *quota).set(key, value, ttl_ms)
            }
            KvAccess::Redis { conn, prefix, .. } => {
                self.value_fits(key, &value)?;
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{prefix}{key}")).arg(value);
                if let Some(ms) = ttl_ms {
                    cmd.arg("PX").arg(ms.max(1));
                }
                cmd.query_async(&mut conn.clone()).await.map_err(backend)
            }
        }
    }

    /// Removes `key`; whether it was there (and live).
    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        match self {
            KvAccess::Memory { space, quota } => MemoryAccess(space, *quota).delete(key),
            KvAccess::Redis { conn, prefix, .. } => {
                check_key(key)?;
                let n: u64 = redis::cmd("DEL")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(backend)?;
                Ok(n > 0)
            }
        }
    }

    /// Sets `key` to `new` if its live value is `expected` (`None`: absent).
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        match self {
            KvAccess::Memory { space, quota } => {
                MemoryAccess(space, *quota).compare_and_swap(key, expected, new, ttl_ms)
            }
            KvAccess::Redis { conn, prefix, .. } => {
                self.value_fits(key, &new)?;
                let swapped: i64 = CAS_SCRIPT
                    .key(format!("{prefix}{key}"))
                    .arg(if expected.is_some() { "1" } else { "0" })
                    .arg(expected.unwrap_or_default())
                    .arg(new)
                    .arg(ttl_arg(ttl_ms))
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(backend)?;
                Ok(swapped == 1)
            }
        }
    }

    /// Adds `delta` to the decimal integer at `key` (0 when absent); the new value.
    pub async fn increment(
        &self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, KvError> {
        match self {
            KvAccess::Memory { space, quota } => {
                MemoryAccess(space, *quota).increment(key, delta, ttl_ms)
            }
            KvAccess::Redis { conn, prefix, .. } => {
                check_key(key)?;
                INCREMENT_SCRIPT
                    .key(format!("{prefix}{key}"))
                    .arg(delta)
                    .arg(ttl_arg(ttl_ms))
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(backend)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-process operations on a fresh namespace (they are synchronous underneath).
    struct Sync(KvAccess);

    impl Sync {
        fn run<T>(f: impl std::future::Future<Output = T>) -> T {
            use futures_util::FutureExt;
            f.now_or_never().expect("the in-process store never waits")
        }
        fn get(&self, k: &str) -> Result<Option<Vec<u8>>, KvError> {
            Self::run(self.0.get(k))
        }
        fn set(&self, k: &str, v: Vec<u8>, ttl: Option<u64>) -> Result<(), KvError> {
            Self::run(self.0.set(k, v, ttl))
        }
        fn delete(&self, k: &str) -> Result<bool, KvError> {
            Self::run(self.0.delete(k))
        }
        fn compare_and_swap(
            &self,
            k: &str,
            e: Option<&[u8]>,
            n: Vec<u8>,
            ttl: Option<u64>,
        ) -> Result<bool, KvError> {
            Self::run(self.0.compare_and_swap(k, e, n, ttl))
        }
        fn increment(&self, k: &str, d: i64, ttl: Option<u64>) -> Result<i64, KvError> {
            Self::run(self.0.increment(k, d, ttl))
        }
    }

    fn access(keys: usize, bytes: usize) -> Sync {
        Sync(KvStore::default().access(
            "p",
            KvQuota {
                max_keys: keys,
                max_bytes: bytes,
            },
        ))
    }

    #[test]
    fn get_set_delete_cas_and_increment() {
        let kv = access(100, 1 << 20);
        assert_eq!(kv.get("a").unwrap(), None);
        kv.set("a", b"1".to_vec(), None).unwrap();
        assert_eq!(kv.get("a").unwrap().as_deref(), Some(&b"1"[..]));
        assert!(!kv
            .compare_and_swap("a", Some(b"2"), b"3".to_vec(), None)
            .unwrap());
        assert!(kv
            .compare_and_swap("a", Some(b"1"), b"3".to_vec(), None)
            .unwrap());
        assert!(kv.compare_and_swap("b", None, b"x".to_vec(), None).unwrap());
        assert!(!kv.compare_and_swap("b", None, b"y".to_vec(), None).unwrap());
        assert_eq!(kv.increment("n", 5, None).unwrap(), 5);
        assert_eq!(kv.increment("n", -7, None).unwrap(), -2);
        assert!(matches!(
            kv.increment("b", 1, None),
            Err(KvError::Backend(_))
        ));
        kv.set("max", i64::MAX.to_string().into_bytes(), None)
            .unwrap();
        assert!(kv.increment("max", 1, None).is_err());
        assert!(kv.delete("a").unwrap());
        assert!(!kv.delete("a").unwrap());
        assert!(kv.get(&"k".repeat(MAX_KEY + 1)).is_err());
    }

    #[test]
    fn expired_keys_are_gone_and_make_room() {
        let kv = access(2, 1 << 20);
        kv.set("short", b"v".to_vec(), Some(0)).unwrap();
        assert_eq!(kv.get("short").unwrap(), None);
        kv.set("a", b"v".to_vec(), Some(0)).unwrap();
        kv.set("b", b"v".to_vec(), None).unwrap();
        // "a" expired: the sweep makes room for a second live key.
        kv.set("c", b"v".to_vec(), None).unwrap();
        let full = kv.set("d", b"v".to_vec(), None).unwrap_err();
        assert!(
            matches!(full, KvError::Quota(ref m) if m.contains("kv-max-keys")),
            "{full}"
        );
        // An existing key's expiry survives an increment.
        kv.delete("b").unwrap();
        assert_eq!(kv.increment("hits", 1, Some(0)).unwrap(), 1);
        assert_eq!(kv.get("hits").unwrap(), None);
    }

    #[test]
    fn the_byte_quota_refuses_a_write_whole() {
        let kv = access(100, 1024);
        kv.set("a", vec![0; 1000], None).unwrap();
        let refused = kv.set("b", vec![0; 100], None).unwrap_err();
        assert!(matches!(refused, KvError::Quota(ref m) if m.contains("kv-max-bytes")));
        assert_eq!(kv.get("b").unwrap(), None);
        // Replacing counts the old value out.
        kv.set("a", vec![1; 1010], None).unwrap();
    }

    #[test]
    fn namespaces_are_per_plugin_and_outlive_their_accesses() {
        let store = KvStore::default();
        let q = KvQuota::default();
        Sync(store.access("one", q))
            .set("k", b"1".to_vec(), None)
            .unwrap();
        assert_eq!(Sync(store.access("two", q)).get("k").unwrap(), None);
        assert_eq!(
            Sync(store.access("one", q)).get("k").unwrap().as_deref(),
            Some(&b"1"[..])
        );
    }
}
