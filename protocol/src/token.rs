//! Platform-signed device tokens.
//!
//! Format: `fg1.<base64url(JSON claims)>.<base64url(Ed25519 signature)>`, the
//! signature covering everything before the last dot. A token is the MQTT
//! password (username = client id = `sub`) and the HTTP bearer token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::Role;

const PREFIX: &str = "fg1.";
/// Long enough for any real token; refusing longer input early keeps a
/// garbage "password" from costing more than a length check.
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Device id the token was issued to.
    pub sub: String,
    pub role: Role,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {0} (Unix seconds)")]
    Expired(i64),
    #[error("token is not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
}

pub struct TokenSigner {
    key: Ed25519KeyPair,
}

impl TokenSigner {
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|key| TokenSigner { key })
            .map_err(|e| format!("platform key is not a valid Ed25519 PKCS#8 document: {e}"))
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier::new(self.public_key())
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).expect("claims serialize");
        let mut token = String::with_capacity(PREFIX.len() + body.len() * 2 + 90);
        token.push_str(PREFIX);
        B64.encode_string(&body, &mut token);
        let signature = self.key.sign(token.as_bytes());
        token.push('.');
        B64.encode_string(signature.as_ref(), &mut token);
        token
    }

    /// Signs arbitrary bytes with the platform key (SDK manifests, state
    /// announcements): one key is the root of trust for everything.
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }
}

#[derive(Clone)]
pub struct TokenVerifier {
    public_key: Vec<u8>,
}

impl TokenVerifier {
    pub fn new(public_key: Vec<u8>) -> Self {
        TokenVerifier { public_key }
    }

    /// Checks format, signature and validity window; `now` is Unix seconds.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let claims = self.signed_claims(token)?;
        if claims.exp <= now {
            return Err(TokenError::Expired(claims.exp));
        }
        // A small allowance for clocks that disagree by a few seconds.
        if claims.iat > now + 60 {
            return Err(TokenError::NotYetValid(claims.iat));
        }
        Ok(claims)
    }

    /// The claims of a token carrying a valid platform signature, whatever
    /// its validity window says (for deciding whom a failure is held against).
    pub fn signed_claims(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(
                "longer than any token fleetgate issues",
            ));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("missing fg1. prefix"))?;
        let (body_b64, sig_b64) = rest
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("missing signature part"))?;
        let signature = B64
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed_len = PREFIX.len() + body_b64.len();
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(&token.as_bytes()[..signed_len], &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let body = B64
            .decode(body_b64)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        serde_json::from_slice(&body)
            .map_err(|_| TokenError::Malformed("claims are not the expected JSON"))
    }
}

/// The device a token claims to be for, without checking anything: only for
/// attributing a refusal to someone. `None` when nothing plausible is there.
pub fn claimed_subject(token: &str) -> Option<String> {
    let body = token.strip_prefix(PREFIX)?.split('.').next()?;
    let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
    crate::validate_device_id(&claims.sub)
        .ok()
        .map(|_| claims.sub)
}

/// Verifies an Ed25519 signature made with `TokenSigner::sign_bytes`.
pub fn verify_bytes(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn signer() -> TokenSigner {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        TokenSigner::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "sensor-1".into(),
            role: Role::Ingest,
            iat: 1_000,
            exp,
        }
    }

    #[test]
    fn round_trips_claims() {
        let s = signer();
        let token = s.sign(&claims(2_000));
        assert_eq!(s.verifier().verify(&token, 1_500), Ok(claims(2_000)));
    }

    #[test]
    fn refuses_expired_tampered_and_foreign_tokens() {
        let s = signer();
        let token = s.sign(&claims(2_000));
        assert_eq!(
            s.verifier().verify(&token, 2_000),
            Err(TokenError::Expired(2_000))
        );

        // Swap the claims for an admin role but keep the old signature.
        let (_, sig) = token.rsplit_once('.').unwrap();
        let forged_body = B64.encode(
            serde_json::to_vec(&Claims {
                role: Role::Admin,
                ..claims(2_000)
            })
            .unwrap(),
        );
        let forged = format!("fg1.{forged_body}.{sig}");
        assert_eq!(
            s.verifier().verify(&forged, 1_500),
            Err(TokenError::BadSignature)
        );

        assert_eq!(
            signer().verifier().verify(&token, 1_500),
            Err(TokenError::BadSignature)
        );
        assert!(matches!(
            s.verifier().verify("hunter2", 1_500),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            s.verifier().verify(&"x".repeat(10_000), 1_500),
            Err(TokenError::Malformed(_))
        ));
    }
}
