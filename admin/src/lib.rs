//! fleetgate administration: the platform signing key, the device registry,
//! token authentication, and the ledger of refusals that raises alerts.
//!
//! - [`platform`]: the Ed25519 key and the first admin token.
//! - [`registry`]: devices, their roles and revocation (database + cache).
//! - [`auth`]: [`TokenAuthenticator`], the one place a token becomes a principal.
//! - [`refusals`]: per-device refusal counts and repeated-failure alerts.
//! - [`bans`]: temporary bans that follow those alerts.
//! - [`audit`]: the log of every admin action.
//! - [`handshake`]: nonces and the checks on a device's signed SDK handshake.
//! - [`rollout`]: the time-fenced state rollout coordinator.

pub mod audit;
pub mod auth;
pub mod bans;
pub mod handshake;
pub mod platform;
pub mod refusals;
pub mod registry;
pub mod rollout;

pub use audit::AuditLog;
pub use auth::TokenAuthenticator;
pub use bans::{Ban, Bans};
pub use handshake::{HandshakeError, Handshakes};
pub use platform::Platform;
pub use refusals::RefusalLedger;
pub use registry::{Device, Registry, RegistryEvent};

pub use fleetgate_protocol::{unix_now, unix_now_ms};
