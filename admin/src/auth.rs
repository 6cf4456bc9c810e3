use std::sync::Arc;

use fleetgate_protocol::{AuthError, Authenticate, Principal, TokenVerifier};

use crate::refusals::RefusalLedger;
use crate::registry::Registry;

/// The one place a token becomes a principal, for MQTT and HTTP alike: the
/// signature and expiry, then the registry (unknown, revoked, tokens reset).
/// The effective role is the lower of the token's and the registry's, so a
/// downgrade takes effect without waiting for old tokens to expire.
pub struct TokenAuthenticator {
    verifier: TokenVerifier,
    registry: Registry,
    ledger: Arc<RefusalLedger>,
}

impl TokenAuthenticator {
    pub fn new(verifier: TokenVerifier, registry: Registry, ledger: Arc<RefusalLedger>) -> Self {
        TokenAuthenticator {
            verifier,
            registry,
            ledger,
        }
    }

    fn check(&self, client_id: Option<&str>, token: &str) -> Result<Principal, AuthError> {
        let claims = self
            .verifier
            .verify(token, crate::unix_now())
            .map_err(|e| AuthError::BadCredentials(e.to_string()))?;
        if let Some(client_id) = client_id {
            if client_id != claims.sub {
                return Err(AuthError::ClientIdMismatch {
                    client_id: client_id.to_string(),
                    subject: claims.sub,
                });
            }
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
            role: claims.role.min(device.role),
            device_id: claims.sub,
        })
    }
}

impl Authenticate for TokenAuthenticator {
    fn authenticate(&self, client_id: Option<&str>, token: &str) -> Result<Principal, AuthError> {
        self.check(client_id, token).inspect_err(|e| {
            // Count the refusal against whoever the caller claimed to be.
            let claimed = client_id.unwrap_or("(no client id)");
            self.ledger.record(claimed, "auth", &e.to_string());
        })
    }

    fn record_refusal(&self, device_id: &str, what: &str) {
        let kind = what.split(':').next().unwrap_or("refusal");
        self.ledger.record(device_id, kind, what);
    }
}
