//! Wire types shared by every fleetgate part.
//!
//! Nothing here does I/O: these are the words the gatekeeper, the store, the
//! admin service and devices use with each other (roles, signed tokens, topic
//! rules, stream schemas, the ingest hand-off), so that each part can be
//! replaced or run in its own process without the others changing.

pub mod auth;
pub mod duration;
pub mod ingest;
pub mod node;
pub mod record;
pub mod role;
pub mod schema;
pub mod sdk;
pub mod state;
pub mod token;
pub mod topic;

pub use auth::{AuthError, Authenticate, Principal};
pub use ingest::{IngestError, IngestMessage, IngestOutcome, IngestService, PendingCommit};
pub use role::Role;

/// This machine's clock, in Unix seconds.
pub fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

/// This machine's clock, in Unix milliseconds.
pub fn unix_now_ms() -> i64 {
    unix_now_us() / 1000
}

/// This machine's clock, in Unix microseconds.
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
pub use token::{Claims, TokenError, TokenSigner, TokenVerifier};

/// Device ids appear in topics, tokens and SQL values; keeping them to a safe
/// alphabet means no escaping is ever needed and no id can smuggle a wildcard.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    let ok_len = !id.is_empty() && id.len() <= 64;
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid device id {id:?}: use 1-64 characters from A-Z a-z 0-9 - _ ."
        ))
    }
}
