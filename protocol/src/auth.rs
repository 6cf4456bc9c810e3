use crate::Role;

/// An authenticated caller: the device a verified token names, with the role
/// it may act in right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub device_id: String,
    pub role: Role,
    /// The device's type in the registry (`device add --type`), if it has
    /// one. A stream that names its `writers` takes ingest only from those
    /// types, so the store needs it along with the role.
    pub device_type: Option<String>,
    /// When the presented token expires (Unix seconds): a session it opened
    /// ends then, so a connection never outlives its credentials.
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, forged or expired credentials.
    #[error("bad credentials: {0}")]
    BadCredentials(String),
    /// The client id does not match the device the token names.
    #[error("client id {client_id:?} does not match the token's device {subject:?}")]
    ClientIdMismatch { client_id: String, subject: String },
    /// Valid signature, but the device is unknown or revoked.
    #[error("device {0:?} is not authorized: {1}")]
    NotAuthorized(String, String),
    /// Too many recent refusals: the device is banned until `until`.
    #[error("device {device:?} is banned until {until} (Unix seconds) after repeated refusals")]
    Banned { device: String, until: i64 },
}

/// Turns a bearer token into a principal. Implementations record every
/// refusal so that repeated failures raise an alert, whatever the transport.
pub trait Authenticate: Send + Sync {
    /// `client_id` is the MQTT client id when there is one; it must equal the
    /// token's subject.
    fn authenticate(&self, client_id: Option<&str>, token: &str) -> Result<Principal, AuthError>;

    /// Records a refusal decided elsewhere (e.g. a denied publish) against
    /// `device_id`, for the repeated-failure alert.
    fn record_refusal(&self, device_id: &str, what: &str);
}
