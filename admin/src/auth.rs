use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetgate_protocol::token::{claimed_subject, Claims};
use fleetgate_protocol::{AuthError, Authenticate, Principal, Role, TokenVerifier};

use crate::bans::{Ban, Bans};
use crate::refusals::{RefusalLedger, AUTH};
use crate::registry::Registry;

/// The one place a token becomes a principal, for MQTT and HTTP alike: bans,
/// the signature and expiry, then the registry (unknown, revoked, tokens
/// reset). The token identifies the device; the registry decides its role,
/// so a role change applies to the tokens it already holds.
pub struct TokenAuthenticator {
    verifier: TokenVerifier,
    registry: Registry,
    ledger: Arc<RefusalLedger>,
    bans: Bans,
    /// How long a repeated-refusal alert bans the device; 0 disables bans.
    ban_secs: i64,
    /// Tokens whose signature verified, with their claims: a device that
    /// reconnects presents the same token, and an Ed25519 verification is
    /// most of what a CONNECT costs. Only the signature is remembered; the
    /// validity window, bans and the registry are checked every time.
    verified: Mutex<HashMap<Box<str>, Claims>>,
}

/// Verified tokens remembered, at most (cleared when full: it is a cache).
const VERIFIED_TOKENS: usize = 100_000;

impl TokenAuthenticator {
    pub fn new(
        verifier: TokenVerifier,
        registry: Registry,
        ledger: Arc<RefusalLedger>,
        bans: Bans,
        ban_secs: i64,
    ) -> Self {
        TokenAuthenticator {
            verifier,
            registry,
            ledger,
            bans,
            ban_secs,
            verified: Mutex::default(),
        }
    }

    /// The verifier's answer, without verifying a signature that already
    /// verified: the same token string verifies the same way every time.
    fn verify(&self, token: &str, now: i64) -> Result<Claims, AuthError> {
        let known = self
            .verified
            .lock()
            .expect("verified tokens lock")
            .get(token)
            .cloned();
        // Outside its window the verifier gives the exact reason.
        if let Some(claims) = known.filter(|c| c.exp > now && c.iat <= now + 60) {
            return Ok(claims);
        }
        let claims = self
            .verifier
            .verify(token, now)
            .map_err(|e| AuthError::BadCredentials(e.to_string()))?;
        let mut verified = self.verified.lock().expect("verified tokens lock");
        if verified.len() >= VERIFIED_TOKENS {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// On refusal, also names the device a genuinely signed token was issued
    /// to, if it was: only such failures can count toward that device's ban.
    fn check(
        &self,
        client_id: Option<&str>,
        token: &str,
        now: i64,
    ) -> Result<Principal, (AuthError, Option<String>)> {
        self.check_token(client_id, token, now).map_err(|e| {
            let signed_subject = match &e {
                AuthError::BadCredentials(_) => {
                    self.verifier.signed_claims(token).ok().map(|c| c.sub)
                }
                AuthError::NotAuthorized(subject, _) => Some(subject.clone()),
                AuthError::ClientIdMismatch { .. } | AuthError::Banned { .. } => None,
            };
            (e, signed_subject)
        })
    }

    fn check_token(
        &self,
        client_id: Option<&str>,
        token: &str,
        now: i64,
    ) -> Result<Principal, AuthError> {
        if let Some(ban) = client_id.and_then(|id| self.bans.get(id, now)) {
            return Err(AuthError::Banned {
                device: ban.device,
                until: ban.until,
            });
        }
        let claims = self.verify(token, now)?;
        if let Some(client_id) = client_id {
            if client_id != claims.sub {
                return Err(AuthError::ClientIdMismatch {
                    client_id: client_id.to_string(),
                    subject: claims.sub,
                });
            }
        }
        if let Some(ban) = self.bans.get(&claims.sub, now) {
            return Err(AuthError::Banned {
                device: ban.device,
                until: ban.until,
            });
        }
        let device = self
            .registry
            .get(&claims.sub)
            .ok_or_else(|| AuthError::NotAuthorized(claims.sub.clone(), "unknown device".into()))?;
        if device.revoked_at.is_some() {
            return Err(AuthError::NotAuthorized(
                claims.sub,
                "device is revoked".into(),
            ));
        }
        if claims.iat < device.tokens_not_before {
            return Err(AuthError::BadCredentials(
                "token was issued before the device's tokens were last reset".into(),
            ));
        }
        Ok(Principal {
            role: device.role,
            // From the registry, like the role: a stream's `writers` are
            // judged by what the platform recorded, never by the device.
            device_type: device.device_type,
            device_id: claims.sub,
            expires_at: claims.exp,
        })
    }

    /// Counts a refusal. Repeated authentication failures with genuinely
    /// signed tokens (expired, revoked, reset) ban the device; forged or
    /// garbage tokens, which anyone can make for any device id, only raise
    /// alerts. Admins are never banned, so no one can lock the operators out.
    fn refused(&self, device: &str, kind: &str, reason: &str, bannable: bool) {
        self.ledger.record(device, kind, reason, bannable);
        if !bannable || self.ban_secs <= 0 {
            return;
        }
        let failures = self.ledger.recent_bannable(device);
        let now = crate::unix_now();
        let is_admin = self
            .registry
            .get(device)
            .is_some_and(|d| d.role == Role::Admin);
        if failures < self.ledger.threshold() || is_admin || self.bans.get(device, now).is_some() {
            return;
        }
        let until = now + self.ban_secs;
        tracing::warn!(
            device,
            until,
            failures,
            "banning device after repeated authentication failures"
        );
        self.bans.ban(Ban {
            device: device.to_string(),
            until,
            reason: format!("{failures} authentication failures; last: {reason}"),
        });
        self.registry.announce_ban(device);
    }
}

impl Authenticate for TokenAuthenticator {
    fn authenticate(&self, client_id: Option<&str>, token: &str) -> Result<Principal, AuthError> {
        self.check(client_id, token, crate::unix_now())
            .map_err(|(e, signed_subject)| {
                // A banned device's attempts are not counted again: that would
                // only extend the ban it is already serving.
                if matches!(e, AuthError::Banned { .. }) {
                    return e;
                }
                match signed_subject {
                    // Held against the device the platform issued the token to,
                    // and only when it was presented as that device: someone
                    // else's expired token must not ban whatever id it claims.
                    Some(subject) if client_id.is_none_or(|id| id == subject) => {
                        self.refused(&subject, AUTH, &e.to_string(), true)
                    }
                    _ => {
                        let claimed = client_id
                            .map(str::to_string)
                            .or_else(|| claimed_subject(token))
                            .unwrap_or_else(|| "(unidentified)".to_string());
                        self.refused(&claimed, AUTH, &e.to_string(), false)
                    }
                }
                e
            })
    }

    fn record_refusal(&self, device_id: &str, what: &str) {
        let kind = what.split(':').next().unwrap_or("refusal");
        self.refused(device_id, kind, what, false);
    }
}
