//! The signed handshake, every check on its answer, and renewal.

use std::sync::Arc;
use std::time::Duration;

use fleetgate_protocol::sdk::{HandshakeClaims, Manifest, SdkBundle, Target, SDK_VERSION};
use fleetgate_protocol::unix_now_ms;
use fleetgate_protocol::{Role, TokenVerifier};
use serde::Deserialize;
use serde_json::json;

use crate::runtime::SdkModule;
use crate::{DeviceConfig, SdkError, Shared};

/// A verified, loaded SDK and the credentials that came with it.
pub struct Session {
    pub module: SdkModule,
    /// The bundle as received, for keeping on disk.
    pub bundle: SdkBundle,
    pub manifest: Manifest,
    pub token: String,
    pub token_issued_at: i64,
    pub token_expires_at: i64,
    /// MQTT `host:port`.
    pub mqtt: String,
}

/// What a device requires of a bundle before it loads it.
pub struct Expected<'a> {
    pub device_id: &'a str,
    /// The role of the token that came with it; `None` for a flashed bundle.
    pub role: Option<Role>,
    /// The nonce the device sent; `None` for a flashed bundle.
    pub nonce: Option<&'a str>,
    pub target: Option<Target>,
    /// Unix seconds.
    pub now: i64,
}

/// Verifies a bundle: the platform signature, the artifact's length and
/// SHA-256, then that it was made for this device, role, handshake and
/// target, and has not expired. Returns the artifact only if all hold.
pub fn verify_bundle(
    bundle: &SdkBundle,
    platform_key: &[u8],
    expected: &Expected<'_>,
) -> Result<(Manifest, Vec<u8>), SdkError> {
    let (manifest, artifact) = bundle
        .open(platform_key)
        .map_err(|e| SdkError::Verify(e.to_string()))?;
    let refuse = |what: String| Err(SdkError::Verify(what));
    if manifest.device_id != expected.device_id {
        return refuse(format!(
            "SDK was built for device {:?}, not {:?}",
            manifest.device_id, expected.device_id
        ));
    }
    if let Some(role) = expected.role.filter(|r| *r != manifest.role) {
        return refuse(format!(
            "SDK is for the {} role but the token is for {role}",
            manifest.role
        ));
    }
    if expected.nonce.is_some() && manifest.nonce.as_deref() != expected.nonce {
        return refuse("SDK answers another handshake (nonce differs)".into());
    }
    if let Some(target) = expected.target.filter(|t| *t != manifest.target) {
        return refuse(format!(
            "SDK was built for {}, not {target}",
            manifest.target
        ));
    }
    if manifest.expires_at <= expected.now {
        return refuse(format!(
            "SDK manifest expired at {} (Unix seconds)",
            manifest.expires_at
        ));
    }
    if manifest.sdk_version.split('.').next() != SDK_VERSION.split('.').next() {
        return refuse(format!(
            "SDK version {} is not one this runtime ({SDK_VERSION}) runs",
            manifest.sdk_version
        ));
    }
    Ok((manifest, artifact))
}

#[derive(Deserialize)]
struct NonceResponse {
    nonce: String,
}

#[derive(Deserialize)]
struct HandshakeResponse {
    token: String,
    mqtt_port: u16,
    /// Present when the server serves MQTT over TLS.
    mqtts_port: Option<u16>,
    sdk: SdkBundle,
}

async fn json_or_refusal<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, SdkError> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| SdkError::Network(e.to_string()))?;
    if !status.is_success() {
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(SdkError::Refused(format!("{status}: {reason}")));
    }
    serde_json::from_slice(&body).map_err(|e| SdkError::Network(format!("unreadable answer: {e}")))
}

/// The claims this device states, for a given nonce.
pub fn claims(config: &DeviceConfig, nonce: String) -> HandshakeClaims {
    HandshakeClaims {
        device_id: config.device_id.clone(),
        device_type: config.device_type.clone(),
        fingerprint: config.fingerprint.clone(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        secure_transfer: crate::tls::secure(config),
        sdk_version: SDK_VERSION.to_string(),
        target: config.target,
        nonce,
        timestamp_ms: unix_now_ms(),
    }
}

/// Times a 429 from the handshake routes is waited out before it is
/// reported, and the longest wait honoured for one.
const RATE_LIMIT_RETRIES: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Sends a request to a handshake route. Those routes are rate limited per
/// client address, and devices behind one NAT share an address: a 429 is
/// waited out as its `Retry-After` says (at most `MAX_RETRY_AFTER`) a few
/// times before it becomes the caller's error.
async fn send_limited(
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, SdkError> {
    let mut attempt = 0;
    loop {
        let response = request()
            .send()
            .await
            .map_err(|e| SdkError::Network(e.to_string()))?;
        if response.status() != reqwest::StatusCode::TOO_MANY_REQUESTS
            || attempt >= RATE_LIMIT_RETRIES
        {
            return Ok(response);
        }
        attempt += 1;
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
            .clamp(Duration::from_secs(1), MAX_RETRY_AFTER);
        tracing::debug!(?wait, attempt, "handshake rate limited; waiting");
        tokio::time::sleep(wait).await;
    }
}

/// Asks for a nonce, signs the claims, and verifies and loads the answer.
/// The nonce is opaque here: the server alone reads it.
pub async fn handshake(config: &DeviceConfig, http: &reqwest::Client) -> Result<Session, SdkError> {
    let nonce: NonceResponse = json_or_refusal(
        send_limited(|| http.get(format!("{}/v1/handshake/nonce", config.server))).await?,
    )
    .await?;
    let claims = claims(config, nonce.nonce);
    let signed = config.key.sign_handshake(&claims);
    let answer: HandshakeResponse = json_or_refusal(
        send_limited(|| {
            http.post(format!("{}/v1/handshake", config.server))
                .json(&json!(signed))
        })
        .await?,
    )
    .await?;
    let now = unix_now_ms() / 1000;
    let token = TokenVerifier::new(config.platform_key.clone())
        .verify(&answer.token, now)
        .map_err(|e| SdkError::Verify(format!("the token that came with the SDK: {e}")))?;
    if token.sub != config.device_id {
        return Err(SdkError::Verify(format!(
            "the token is for {:?}, not this device",
            token.sub
        )));
    }
    let expected = Expected {
        device_id: &config.device_id,
        role: Some(token.role),
        nonce: Some(&claims.nonce),
        target: config.target,
        now,
    };
    let (manifest, artifact) = verify_bundle(&answer.sdk, &config.platform_key, &expected)?;
    let module = SdkModule::load(&manifest, &artifact, config.limits)?;
    // A device that can do secure transfer never falls back to plain MQTT.
    let port = if crate::tls::secure(config) {
        answer.mqtts_port.ok_or_else(|| {
            SdkError::Refused("the server offers no MQTT over TLS to this secure device".into())
        })?
    } else {
        answer.mqtt_port
    };
    let mqtt = config.mqtt.clone().unwrap_or_else(|| {
        let host = reqwest::Url::parse(&config.server)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "127.0.0.1".into());
        format!("{host}:{port}")
    });
    Ok(Session {
        module,
        bundle: answer.sdk,
        manifest,
        token: answer.token,
        token_issued_at: token.iat,
        token_expires_at: token.exp,
        mqtt,
    })
}

/// Handshakes again once three quarters of the token's life have passed,
/// replacing the token (and the SDK, if the platform now builds another).
pub(crate) async fn renew(shared: Arc<Shared>) {
    let mut retry = Duration::from_secs(1);
    loop {
        let (issued, expires) = {
            let session = shared.session.lock().expect("session lock");
            (session.token_issued_at, session.token_expires_at)
        };
        let renew_at_ms = issued * 1000 + (expires - issued) * 750;
        let wait = (renew_at_ms - unix_now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match refresh(&shared).await {
            Ok(()) => retry = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, "token renewal failed; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Handshakes again and swaps in the new token and SDK.
pub(crate) async fn refresh(shared: &Shared) -> Result<(), SdkError> {
    match handshake(&shared.config, &shared.http).await {
        Ok(session) => {
            *shared.session.lock().expect("session lock") = session;
            shared.status.send_modify(|s| {
                s.handshakes += 1;
                s.last_error = None;
            });
            Ok(())
        }
        Err(e) => {
            shared
                .status
                .send_modify(|s| s.last_error = Some(format!("handshake: {e}")));
            Err(e)
        }
    }
}
