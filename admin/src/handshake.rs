//! The device side of SDK delivery: single-use nonces and the checks a signed
//! handshake must pass before the platform builds anything for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use fleetgate_protocol::sdk::{from_hex, HandshakeClaims, SignedHandshake, SDK_VERSION};
use fleetgate_protocol::Authenticate;
use ring::rand::{SecureRandom, SystemRandom};

use crate::bans::Bans;
use crate::registry::{Device, Registry};

/// A nonce is good for one handshake within this time.
pub const NONCE_TTL_MS: i64 = 60_000;
/// How far a device's clock may be from ours.
pub const MAX_CLOCK_SKEW_MS: i64 = 60_000;
/// Outstanding nonces are bounded: anyone may ask for one.
const MAX_OUTSTANDING: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request itself is unreadable.
    #[error("{0}")]
    Malformed(String),
    /// Readable, but refused; counted toward the device's refusal alert.
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("too many outstanding handshake nonces; retry shortly")]
    Busy,
}

pub struct Handshakes {
    registry: Registry,
    bans: Bans,
    auth: Arc<dyn Authenticate>,
    /// nonce → expiry (Unix ms).
    nonces: Mutex<HashMap<String, i64>>,
    random: SystemRandom,
}

impl Handshakes {
    pub fn new(registry: Registry, bans: Bans, auth: Arc<dyn Authenticate>) -> Handshakes {
        Handshakes {
            registry,
            bans,
            auth,
            nonces: Mutex::new(HashMap::new()),
            random: SystemRandom::new(),
        }
    }

    /// A fresh single-use nonce and its expiry (Unix ms).
    pub fn issue_nonce(&self, now_ms: i64) -> Result<(String, i64), HandshakeError> {
        let mut bytes = [0u8; 18];
        self.random
            .fill(&mut bytes)
            .map_err(|_| HandshakeError::Busy)?;
        let nonce = B64URL.encode(bytes);
        let expires = now_ms + NONCE_TTL_MS;
        let mut nonces = self.nonces.lock().expect("nonce lock");
        if nonces.len() >= MAX_OUTSTANDING {
            nonces.retain(|_, expiry| *expiry > now_ms);
            if nonces.len() >= MAX_OUTSTANDING {
                return Err(HandshakeError::Busy);
            }
        }
        nonces.insert(nonce.clone(), expires);
        Ok((nonce, expires))
    }

    /// Checks a handshake: a known, unrevoked, unbanned device with a
    /// registered key, a valid signature, a supported SDK version, a fresh
    /// timestamp and an unused nonce. The nonce is spent only once the
    /// signature verifies, so a forger cannot burn a device's nonces.
    pub fn verify(
        &self,
        signed: &SignedHandshake,
        now_ms: i64,
    ) -> Result<(HandshakeClaims, Device), HandshakeError> {
        let claimed = signed
            .unverified_claims()
            .map_err(HandshakeError::Malformed)?;
        let device_id = claimed.device_id.clone();
        self.check(signed, claimed, now_ms).inspect_err(|e| {
            if let HandshakeError::Refused(reason) = e {
                self.auth
                    .record_refusal(&device_id, &format!("handshake: {reason}"));
            }
        })
    }

    fn check(
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
        let claims = signed.verify(&key).map_err(refuse)?;
        let major = |v: &str| v.split('.').next().unwrap_or_default().to_string();
        if major(&claims.sdk_version) != major(SDK_VERSION) {
            return Err(refuse(format!(
                "SDK version {:?} is not supported; this server builds {SDK_VERSION}",
                claims.sdk_version
            )));
        }
        if (claims.timestamp_ms - now_ms).abs() > MAX_CLOCK_SKEW_MS {
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
        let expiry = self
            .nonces
            .lock()
            .expect("nonce lock")
            .remove(&claims.nonce);
        match expiry {
            Some(expiry) if expiry >= now_ms => Ok((claims, device)),
            Some(_) => Err(refuse("nonce expired".into())),
            None => Err(refuse(
                "nonce is unknown or already used (replayed handshake?)".into(),
            )),
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

    #[tokio::test]
    async fn a_nonce_expires_unused_and_the_refusal_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, &dir.path().join("t.db")).await.unwrap();
        let registry = Registry::load(db.clone()).await.unwrap();
        let bans = Bans::load(db, 0).await.unwrap();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
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
        let refusals = Arc::new(Refusals::default());
        let handshakes = Handshakes::new(registry, bans, refusals.clone());

        let now = 1_800_000_000_000;
        let (fresh, expires) = handshakes.issue_nonce(now).unwrap();
        assert_eq!(expires, now + NONCE_TTL_MS);
        let signed = SignedHandshake::sign(&claims(&fresh, now), &key);
        assert!(handshakes.verify(&signed, now + 1_000).is_ok());

        // Used past its expiry (with a clock that agrees), it is refused.
        let (stale, _) = handshakes.issue_nonce(now).unwrap();
        let later = now + NONCE_TTL_MS + 1;
        let signed = SignedHandshake::sign(&claims(&stale, later), &key);
        assert_eq!(
            handshakes.verify(&signed, later).unwrap_err(),
            HandshakeError::Refused("nonce expired".into())
        );
        let counted = refusals.0.lock().unwrap().clone();
        assert_eq!(
            counted,
            vec![("t1".to_string(), "handshake: nonce expired".to_string())]
        );
    }
}
