//! The device side of SDK delivery: stateless handshake nonces and the
//! checks a signed handshake must pass before the platform builds anything
//! for it.
//!
//! Anyone may ask for a nonce, so issuing one must cost the server nothing:
//! a nonce is its expiry time and 16 random bytes, sealed with an HMAC whose
//! key is derived from the platform key ([`crate::Platform::nonce_key`]).
//! The server keeps no record of the nonces it hands out; it recognises its
//! own by the HMAC, and every broker sharing `platform.key` (a cluster, or
//! the same server after a restart) recognises them alike. Only *used*
//! nonces are remembered, in the database every broker shares, until they
//! expire, so a replayed handshake is refused on any broker. A nonce can be
//! used only by a handshake whose signature verifies under a registered
//! device key, so that table grows with genuine handshakes, never with a
//! stranger's requests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use fleetgate_protocol::sdk::{from_hex, HandshakeClaims, SignedHandshake, SDK_VERSION};
use fleetgate_protocol::Authenticate;
use fleetgate_store::{with_pool, Db};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::bans::Bans;
use crate::registry::{Device, Registry};

/// By default a nonce is good for one handshake within this time of its
/// issue (`--nonce-ttl`).
pub const NONCE_TTL_MS: i64 = 60_000;
/// The longest nonce lifetime a server may be configured with; a nonce
/// that claims to live longer was not issued by a platform broker.
pub const MAX_NONCE_TTL_MS: i64 = 600_000;
/// How far a device's clock may be from ours.
pub const MAX_CLOCK_SKEW_MS: i64 = 60_000;
/// How far ahead of our clock another broker's nonce may have been issued
/// (brokers of a cluster share the key but not a clock, nor necessarily
/// the same `--nonce-ttl`).
pub const NONCE_FUTURE_TOLERANCE_MS: i64 = 5_000;
/// Expired used nonces are swept at most this often.
const SWEEP_EVERY_MS: i64 = 10_000;

/// Nonce layout: version, expiry (Unix ms, big-endian), random bytes, then
/// HMAC-SHA256 over all of those. The expiry, not the issue time, is sealed
/// in, so every broker honours the window of the one that issued it.
const NONCE_VERSION: u8 = 1;
const NONCE_RANDOM: usize = 16;
const NONCE_BODY: usize = 1 + 8 + NONCE_RANDOM;
const NONCE_LEN: usize = NONCE_BODY + 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request itself is unreadable.
    #[error("{0}")]
    Malformed(String),
    /// Readable, but refused; counted toward the device's refusal alert.
    #[error("handshake refused: {0}")]
    Refused(String),
    /// The server could not do its part (random bytes, the used-nonce
    /// table); the device should retry.
    #[error("handshake unavailable: {0}; retry shortly")]
    Unavailable(String),
}

pub struct Handshakes {
    registry: Registry,
    bans: Bans,
    auth: Arc<dyn Authenticate>,
    /// Seals and recognises this platform's nonces.
    nonce_key: hmac::Key,
    /// How long a nonce this server issues stays good (ms).
    nonce_ttl_ms: i64,
    /// Holds the used nonces (`fleetgate_handshake_nonces`).
    db: Db,
    random: SystemRandom,
    /// When expired used nonces were last swept (Unix ms).
    last_sweep: AtomicI64,
}

impl Handshakes {
    /// `nonce_key` comes from [`crate::Platform::nonce_key`]: brokers that
    /// share the platform key accept each other's nonces. `nonce_ttl_ms`
    /// is at most [`MAX_NONCE_TTL_MS`].
    pub async fn open(
        registry: Registry,
        bans: Bans,
        auth: Arc<dyn Authenticate>,
        nonce_key: hmac::Key,
        nonce_ttl_ms: i64,
        db: Db,
    ) -> Result<Handshakes, String> {
        if !(1..=MAX_NONCE_TTL_MS).contains(&nonce_ttl_ms) {
            return Err(format!(
                "the nonce lifetime must be between 1 ms and {} s, not {nonce_ttl_ms} ms",
                MAX_NONCE_TTL_MS / 1000
            ));
        }
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_handshake_nonces \
             (nonce TEXT PRIMARY KEY, expires_at BIGINT NOT NULL)"
                .to_string(),
            "CREATE INDEX IF NOT EXISTS fleetgate_handshake_nonces_expiry \
             ON fleetgate_handshake_nonces (expires_at)"
                .to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the used-nonce table: {e}"))?;
        Ok(Handshakes {
            registry,
            bans,
            auth,
            nonce_key,
            nonce_ttl_ms,
            db,
            random: SystemRandom::new(),
            last_sweep: AtomicI64::new(0),
        })
    }

    /// A fresh single-use nonce and its expiry (Unix ms). Nothing is stored:
    /// a flood of requests costs an HMAC each and no memory.
    pub fn issue_nonce(&self, now_ms: i64) -> Result<(String, i64), HandshakeError> {
        let expires = now_ms + self.nonce_ttl_ms;
        let mut bytes = [0u8; NONCE_LEN];
        bytes[0] = NONCE_VERSION;
        bytes[1..9].copy_from_slice(&expires.to_be_bytes());
        self.random
            .fill(&mut bytes[9..NONCE_BODY])
            .map_err(|_| HandshakeError::Unavailable("no random bytes".into()))?;
        let tag = hmac::sign(&self.nonce_key, &bytes[..NONCE_BODY]);
        bytes[NONCE_BODY..].copy_from_slice(tag.as_ref());
        Ok((B64URL.encode(bytes), expires))
    }

    /// The expiry (Unix ms) of a nonce this platform issued and that has not
    /// expired; says why otherwise. Needs no state.
    fn nonce_expiry(&self, nonce: &str, now_ms: i64) -> Result<i64, String> {
        let unknown = || "nonce is unknown (this platform did not issue it)".to_string();
        let bytes = B64URL.decode(nonce).map_err(|_| unknown())?;
        if bytes.len() != NONCE_LEN || bytes[0] != NONCE_VERSION {
            return Err(unknown());
        }
        hmac::verify(&self.nonce_key, &bytes[..NONCE_BODY], &bytes[NONCE_BODY..])
            .map_err(|_| unknown())?;
        let expires = i64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        if expires > now_ms + MAX_NONCE_TTL_MS + NONCE_FUTURE_TOLERANCE_MS {
            return Err(format!(
                "nonce expires at {expires}, further ahead of the server's clock ({now_ms}) than any nonce lives"
            ));
        }
        if expires < now_ms {
            return Err("nonce expired".into());
        }
        Ok(expires)
    }

    /// Records `nonce` as used; `Ok(false)` if it already was (a replay).
    /// One row per nonce, so two brokers racing to accept the same
    /// handshake cannot both win.
    async fn spend(&self, nonce: &str, expires: i64, now_ms: i64) -> Result<bool, String> {
        // A row must outlive every broker's view of the nonce as unexpired.
        let keep_until = expires + NONCE_FUTURE_TOLERANCE_MS;
        let inserted = with_pool!(self.db, pool => {
            sqlx::query(
                "INSERT INTO fleetgate_handshake_nonces (nonce, expires_at) VALUES ($1, $2) \
                 ON CONFLICT (nonce) DO NOTHING",
            )
            .bind(nonce)
            .bind(keep_until)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1)
        })
        .map_err(|e| format!("cannot record the used nonce: {e}"))?;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now_ms - last >= SWEEP_EVERY_MS
            && self
                .last_sweep
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Expired nonces are refused by their time stamp alone, so
            // their rows are no longer needed; a failed sweep is retried
            // at the next.
            let swept = with_pool!(self.db, pool => {
                sqlx::query("DELETE FROM fleetgate_handshake_nonces WHERE expires_at < $1")
                    .bind(now_ms)
                    .execute(pool)
                    .await
                    .map(|_| ())
            });
            if let Err(e) = swept {
                tracing::warn!(error = %e, "cannot sweep expired handshake nonces");
            }
        }
        Ok(inserted)
    }

    /// Checks a handshake: a known, unrevoked, unbanned device with a
    /// registered key, a nonce this platform issued that has not expired, a
    /// valid signature, a supported SDK version, a fresh timestamp, and a
    /// nonce not used before. The nonce is spent only once everything else
    /// holds, so a forger cannot burn a device's nonces.
    pub async fn verify(
        &self,
        signed: &SignedHandshake,
        now_ms: i64,
    ) -> Result<(HandshakeClaims, Device), HandshakeError> {
        let claimed = signed
            .unverified_claims()
            .map_err(HandshakeError::Malformed)?;
        let device_id = claimed.device_id.clone();
        self.check(signed, claimed, now_ms).await.inspect_err(|e| {
            if let HandshakeError::Refused(reason) = e {
                self.auth
                    .record_refusal(&device_id, &format!("handshake: {reason}"));
            }
        })
    }

    async fn check(
        &self,
        signed: &SignedHandshake,
        claimed: HandshakeClaims,
        now_ms: i64,
    ) -> Result<(HandshakeClaims, Device), HandshakeError> {
        let refuse = |reason: String| HandshakeError::Refused(reason);
        let id = &claimed.device_id;
        let device = self
            .registry
            .get(id)
            .ok_or_else(|| refuse(format!("unknown device {id:?}")))?;
        if device.revoked_at.is_some() {
            return Err(refuse(format!("device {id:?} is revoked")));
        }
        if let Some(ban) = self.bans.get(id, now_ms / 1000) {
            return Err(refuse(format!(
                "device {id:?} is banned until {} (Unix seconds)",
                ban.until
            )));
        }
        let key = device
            .public_key
            .as_deref()
            .and_then(|hex| from_hex(hex).ok())
            .ok_or_else(|| {
                refuse(format!(
                    "device {id:?} has no registered public key (register one with device add --public-key)"
                ))
            })?;
        // An HMAC before a signature check: nonces that were never issued
        // or have expired are turned away at the cheaper of the two.
        let expires = self.nonce_expiry(&claimed.nonce, now_ms).map_err(refuse)?;
        let claims = signed.verify(&key).map_err(refuse)?;
        let major = |v: &str| v.split('.').next().unwrap_or_default().to_string();
        if major(&claims.sdk_version) != major(SDK_VERSION) {
            return Err(refuse(format!(
                "SDK version {:?} is not supported; this server builds {SDK_VERSION}",
                claims.sdk_version
            )));
        }
        // `abs_diff`: a timestamp near i64::MIN overflowed `(t - now).abs()`
        // (a panic; in a release build, at exactly now + i64::MIN, a pass).
        if claims.timestamp_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS.unsigned_abs() {
            return Err(refuse(format!(
                "timestamp {} is more than {} s from the server's clock ({now_ms})",
                claims.timestamp_ms,
                MAX_CLOCK_SKEW_MS / 1000
            )));
        }
        if let Some(registered) = &device.device_type {
            if *registered != claims.device_type {
                return Err(refuse(format!(
                    "device {id:?} is registered as a {registered:?}, not a {:?}",
                    claims.device_type
                )));
            }
        }
        match self.spend(&claims.nonce, expires, now_ms).await {
            Ok(true) => Ok((claims, device)),
            Ok(false) => Err(refuse("nonce already used (replayed handshake?)".into())),
            Err(e) => Err(HandshakeError::Unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use fleetgate_protocol::sdk::Target;
    use fleetgate_protocol::{AuthError, Principal, Role};
    use fleetgate_store::Db;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    use super::*;

    /// Records what the handshake refused, in place of the real ledger.
    #[derive(Default)]
    struct Refusals(StdMutex<Vec<(String, String)>>);

    impl Authenticate for Refusals {
        fn authenticate(&self, _: Option<&str>, _: &str) -> Result<Principal, AuthError> {
            unreachable!("handshakes do not authenticate tokens")
        }
        fn record_refusal(&self, device_id: &str, what: &str) {
            self.0.lock().unwrap().push((device_id.into(), what.into()));
        }
    }

    fn claims(nonce: &str, timestamp_ms: i64) -> HandshakeClaims {
        HandshakeClaims {
            device_id: "t1".into(),
            device_type: "thermostat".into(),
            fingerprint: "fw".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            secure_transfer: false,
            sdk_version: SDK_VERSION.into(),
            target: Some(Target::Wasm),
            nonce: nonce.into(),
            timestamp_ms,
        }
    }

    struct Fixture {
        handshakes: Handshakes,
        refusals: Arc<Refusals>,
        key: Ed25519KeyPair,
        _dir: tempfile::TempDir,
    }

    /// Handshakes over a fresh SQLite database with one registered
    /// thermostat, `t1`; `db_dir` lets two share a database (a cluster).
    async fn fixture(nonce_key: &hmac::Key, db_dir: Option<&std::path::Path>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = db_dir.unwrap_or(dir.path()).join("t.db");
        let db = Db::open(None, &path).await.unwrap();
        let registry = Registry::load(db.clone()).await.unwrap();
        let bans = Bans::load(db.clone(), 0).await.unwrap();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        if registry.get("t1").is_none() {
            registry
                .add(
                    "t1",
                    Role::Ingest,
                    Some("thermostat"),
                    Some(key.public_key().as_ref()),
                    0,
                )
                .await
                .unwrap();
        } else {
            registry
                .set_public_key("t1", key.public_key().as_ref())
                .await
                .unwrap();
        }
        let refusals = Arc::new(Refusals::default());
        let handshakes = Handshakes::open(
            registry,
            bans,
            refusals.clone(),
            nonce_key.clone(),
            NONCE_TTL_MS,
            db,
        )
        .await
        .unwrap();
        Fixture {
            handshakes,
            refusals,
            key,
            _dir: dir,
        }
    }

    fn nonce_key(seed: &[u8]) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, seed)
    }

    /// Found while writing the handshake_manifest fuzz target
    /// (`fuzz/corpus/handshake_manifest/found-timestamp-min`): the skew
    /// check overflowed for a timestamp near i64::MIN.
    #[tokio::test]
    async fn a_timestamp_at_the_ends_of_time_is_refused() {
        let Fixture {
            handshakes, key, ..
        } = fixture(&nonce_key(b"k"), None).await;
        let now = 1_800_000_000_000;
        for timestamp in [now + i64::MIN, i64::MIN, i64::MAX] {
            let (nonce, _) = handshakes.issue_nonce(now).unwrap();
            let signed = SignedHandshake::sign(&claims(&nonce, timestamp), &key);
            let err = handshakes.verify(&signed, now).await.unwrap_err();
            assert!(
                matches!(&err, HandshakeError::Refused(r) if r.contains("from the server's clock")),
                "{timestamp}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn a_nonce_expires_unused_and_the_refusal_is_counted() {
        let Fixture {
            handshakes,
            refusals,
            key,
            ..
        } = fixture(&nonce_key(b"k"), None).await;

        let now = 1_800_000_000_000;
        let (fresh, expires) = handshakes.issue_nonce(now).unwrap();
        assert_eq!(expires, now + NONCE_TTL_MS);
        let signed = SignedHandshake::sign(&claims(&fresh, now), &key);
        assert!(handshakes.verify(&signed, now + 1_000).await.is_ok());
        // The same handshake again is a replay.
        assert_eq!(
            handshakes.verify(&signed, now + 2_000).await.unwrap_err(),
            HandshakeError::Refused("nonce already used (replayed handshake?)".into())
        );

        // Used past its expiry (with a clock that agrees), it is refused.
        let (stale, _) = handshakes.issue_nonce(now).unwrap();
        let later = now + NONCE_TTL_MS + 1;
        let signed = SignedHandshake::sign(&claims(&stale, later), &key);
        assert_eq!(
            handshakes.verify(&signed, later).await.unwrap_err(),
            HandshakeError::Refused("nonce expired".into())
        );
        let counted = refusals.0.lock().unwrap().clone();
        assert_eq!(
            counted,
            vec![
                (
                    "t1".to_string(),
                    "handshake: nonce already used (replayed handshake?)".to_string()
                ),
                ("t1".to_string(), "handshake: nonce expired".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn issuing_nonces_keeps_no_state_and_forged_ones_are_unknown() {
        let f = fixture(&nonce_key(b"k"), None).await;
        let now = 1_800_000_000_000;
        // Many nonces, none stored: the used-nonce table stays empty.
        for _ in 0..10_000 {
            f.handshakes.issue_nonce(now).unwrap();
        }
        let rows: i64 = with_pool!(f.handshakes.db, pool => {
            sqlx::query_scalar("SELECT count(*) FROM fleetgate_handshake_nonces")
                .fetch_one(pool)
                .await
                .unwrap()
        });
        assert_eq!(rows, 0);
        // A nonce whose time was moved forward, one sealed with another
        // key, and garbage are all unknown.
        let (genuine, _) = f.handshakes.issue_nonce(now).unwrap();
        let mut bytes = B64URL.decode(&genuine).unwrap();
        bytes[8] ^= 1;
        let shifted = B64URL.encode(bytes);
        let (foreign, _) = fixture(&nonce_key(b"other"), None)
            .await
            .handshakes
            .issue_nonce(now)
            .unwrap();
        for nonce in [shifted.as_str(), foreign.as_str(), "made-up", ""] {
            let signed = SignedHandshake::sign(&claims(nonce, now), &f.key);
            let refused = f.handshakes.verify(&signed, now).await.unwrap_err();
            assert_eq!(
                refused,
                HandshakeError::Refused("nonce is unknown (this platform did not issue it)".into()),
                "{nonce}"
            );
        }
        // Living further ahead of this clock than any nonce may.
        let (ahead, _) = f
            .handshakes
            .issue_nonce(now + MAX_NONCE_TTL_MS - NONCE_TTL_MS + NONCE_FUTURE_TOLERANCE_MS + 1)
            .unwrap();
        let signed = SignedHandshake::sign(&claims(&ahead, now), &f.key);
        let refused = f.handshakes.verify(&signed, now).await.unwrap_err();
        assert!(refused.to_string().contains("ahead of the server's clock"));
    }

    #[tokio::test]
    async fn brokers_sharing_the_platform_key_accept_each_others_nonces_once() {
        let shared = tempfile::tempdir().unwrap();
        let key = nonce_key(b"platform");
        let a = fixture(&key, Some(shared.path())).await;
        let b = fixture(&key, Some(shared.path())).await;
        let now = 1_800_000_000_000;
        // b registered the key t1 now has.
        let (nonce, _) = a.handshakes.issue_nonce(now).unwrap();
        let signed = SignedHandshake::sign(&claims(&nonce, now), &b.key);
        assert!(b.handshakes.verify(&signed, now + 10).await.is_ok());
        // Replayed to the broker that issued the nonce: refused there too.
        let a_with_b_key = Handshakes::open(
            Registry::load(a.handshakes.db.clone()).await.unwrap(),
            Bans::load(a.handshakes.db.clone(), 0).await.unwrap(),
            a.refusals.clone(),
            key.clone(),
            NONCE_TTL_MS,
            a.handshakes.db.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            a_with_b_key.verify(&signed, now + 20).await.unwrap_err(),
            HandshakeError::Refused("nonce already used (replayed handshake?)".into())
        );
    }

    #[tokio::test]
    async fn used_nonces_are_forgotten_once_expired() {
        let f = fixture(&nonce_key(b"k"), None).await;
        let count = || async {
            with_pool!(f.handshakes.db, pool => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM fleetgate_handshake_nonces")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            })
        };
        let now = 1_800_000_000_000;
        let (first, _) = f.handshakes.issue_nonce(now).unwrap();
        let signed = SignedHandshake::sign(&claims(&first, now), &f.key);
        f.handshakes.verify(&signed, now).await.unwrap();
        assert_eq!(count().await, 1);
        // A handshake after the first nonce's row expired sweeps it.
        let later = now + NONCE_TTL_MS + NONCE_FUTURE_TOLERANCE_MS + SWEEP_EVERY_MS;
        let (second, _) = f.handshakes.issue_nonce(later).unwrap();
        let signed = SignedHandshake::sign(&claims(&second, later), &f.key);
        f.handshakes.verify(&signed, later).await.unwrap();
        assert_eq!(count().await, 1, "only the second nonce is remembered");
    }
}
