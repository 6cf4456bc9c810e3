//! The device SDK contract: the signed handshake a device opens with, the
//! signed bundle the platform answers with, and the ABI of the generated
//! module inside it. The builder (`fleetgate-sdk-builder`) and the device
//! runtime (`fleetgate-device-sdk`) both follow this file and nothing else.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::{Role, TokenSigner};

/// The SDK generation this server builds; a device reports the one it runs.
pub const SDK_VERSION: &str = "1.0";

/// What an artifact is: portable WebAssembly, or code compiled ahead of time
/// by wasmtime for one architecture (Pulley is wasmtime's portable bytecode
/// for architectures Cranelift cannot compile to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Wasm,
    X86_64,
    Aarch64,
    Riscv64,
    Pulley32,
    Pulley64,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Wasm,
        Target::X86_64,
        Target::Aarch64,
        Target::Riscv64,
        Target::Pulley32,
        Target::Pulley64,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Wasm => "wasm",
            Target::X86_64 => "x86_64",
            Target::Aarch64 => "aarch64",
            Target::Riscv64 => "riscv64",
            Target::Pulley32 => "pulley32",
            Target::Pulley64 => "pulley64",
        }
    }

    /// The triple wasmtime compiles for; `None` for portable WebAssembly.
    pub fn triple(self) -> Option<&'static str> {
        match self {
            Target::Wasm => None,
            Target::X86_64 => Some("x86_64-unknown-linux-gnu"),
            Target::Aarch64 => Some("aarch64-unknown-linux-gnu"),
            Target::Riscv64 => Some("riscv64gc-unknown-linux-gnu"),
            Target::Pulley32 => Some("pulley32"),
            Target::Pulley64 => Some("pulley64"),
        }
    }

    /// The native artifact for a device's reported CPU architecture: machine
    /// code where Cranelift has a backend, Pulley bytecode elsewhere.
    pub fn native_for_arch(arch: &str) -> Target {
        match arch {
            "x86_64" | "amd64" => Target::X86_64,
            "aarch64" | "arm64" => Target::Aarch64,
            "riscv64" | "riscv64gc" => Target::Riscv64,
            a if a.contains("64") => Target::Pulley64,
            _ => Target::Pulley32,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("unknown target {s:?}: use wasm, x86_64, aarch64, riscv64, pulley32 or pulley64")
            })
    }
}

/// Domain separation: a handshake signature can never pass for anything else.
const HANDSHAKE_CONTEXT: &[u8] = b"fleetgate-handshake-v1\n";

/// What a device states about itself when it asks for its SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeClaims {
    pub device_id: String,
    pub device_type: String,
    /// Firmware or hardware fingerprint, as the device computes it.
    pub fingerprint: String,
    pub os: String,
    pub arch: String,
    /// Whether the device can use TLS.
    pub secure_transfer: bool,
    pub sdk_version: String,
    /// The artifact it wants; `None` lets the server choose from `arch`.
    pub target: Option<Target>,
    /// From `GET /v1/handshake/nonce`; good for one handshake.
    pub nonce: String,
    /// Unix milliseconds on the device's clock.
    pub timestamp_ms: i64,
}

/// A handshake as sent: the exact claim bytes and the device's signature over
/// them, so nothing depends on re-serializing JSON identically.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHandshake {
    /// base64url of the claims' JSON.
    pub claims: String,
    /// base64url of the Ed25519 signature over context + claims JSON.
    pub signature: String,
}

impl SignedHandshake {
    pub fn sign(claims: &HandshakeClaims, device_key: &Ed25519KeyPair) -> SignedHandshake {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let signature = device_key.sign(&[HANDSHAKE_CONTEXT, &json].concat());
        SignedHandshake {
            claims: B64URL.encode(&json),
            signature: B64URL.encode(signature.as_ref()),
        }
    }

    /// The claims, not yet verified: only for finding whose key to verify with.
    pub fn unverified_claims(&self) -> Result<HandshakeClaims, String> {
        let json = B64URL
            .decode(&self.claims)
            .map_err(|_| "handshake claims are not base64url".to_string())?;
        serde_json::from_slice(&json).map_err(|e| format!("handshake claims are malformed: {e}"))
    }

    /// Verifies the signature with the device's registered key.
    pub fn verify(&self, device_public_key: &[u8]) -> Result<HandshakeClaims, String> {
        let json = B64URL
            .decode(&self.claims)
            .map_err(|_| "handshake claims are not base64url".to_string())?;
        let signature = B64URL
            .decode(&self.signature)
            .map_err(|_| "handshake signature is not base64url".to_string())?;
        UnparsedPublicKey::new(&ED25519, device_public_key)
            .verify(&[HANDSHAKE_CONTEXT, &json].concat(), &signature)
            .map_err(|_| "handshake signature does not verify with the device's key".to_string())?;
        serde_json::from_slice(&json).map_err(|e| format!("handshake claims are malformed: {e}"))
    }
}

/// What the platform vouches for about one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub device_id: String,
    pub role: Role,
    pub sdk_version: String,
    pub target: Target,
    /// Hex SHA-256 of the artifact bytes.
    pub artifact_sha256: String,
    pub artifact_len: u64,
    /// Hex digest of wasmtime's `precompile_compatibility_hash` for native
    /// artifacts: a runtime whose own digest differs must not load it.
    pub wasmtime_compat: Option<String>,
    /// Hex SHA-256 of the stream schema the module was generated from.
    pub schema_sha256: String,
    /// The handshake nonce this answers; `None` for offline builds.
    pub nonce: Option<String>,
    /// Unix seconds.
    pub issued_at: i64,
    pub expires_at: i64,
}

/// Domain separation for manifest signatures.
const MANIFEST_CONTEXT: &[u8] = b"fleetgate-sdk-manifest-v1\n";

/// A manifest, its platform signature and the artifact: the unit a device
/// receives from a handshake or has flashed from `fleetgate sdk build`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdkBundle {
    /// base64 of the manifest's JSON, signed exactly as sent.
    pub manifest: String,
    /// base64 of the platform's Ed25519 signature over context + manifest JSON.
    pub signature: String,
    /// base64 of the artifact.
    pub artifact: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("SDK bundle is malformed: {0}")]
    Malformed(String),
    #[error("SDK manifest signature does not verify with the platform key")]
    BadSignature,
    #[error("SDK artifact does not match its manifest: {0}")]
    ArtifactMismatch(String),
}

impl SdkBundle {
    pub fn seal(manifest: &Manifest, artifact: &[u8], platform: &TokenSigner) -> SdkBundle {
        let json = serde_json::to_vec(manifest).expect("manifest serializes");
        let signature = platform.sign_bytes(&[MANIFEST_CONTEXT, &json].concat());
        SdkBundle {
            manifest: B64.encode(&json),
            signature: B64.encode(signature),
            artifact: B64.encode(artifact),
        }
    }

    /// Checks, in this order, the platform signature over the manifest, then
    /// the artifact's length and SHA-256 against it. Only then is anything
    /// returned: nothing unverified ever reaches a deserializer.
    pub fn open(&self, platform_public_key: &[u8]) -> Result<(Manifest, Vec<u8>), BundleError> {
        let malformed = |what: &str| BundleError::Malformed(format!("{what} is not base64"));
        let json = B64
            .decode(&self.manifest)
            .map_err(|_| malformed("manifest"))?;
        let signature = B64
            .decode(&self.signature)
            .map_err(|_| malformed("signature"))?;
        UnparsedPublicKey::new(&ED25519, platform_public_key)
            .verify(&[MANIFEST_CONTEXT, &json].concat(), &signature)
            .map_err(|_| BundleError::BadSignature)?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| BundleError::Malformed(format!("manifest: {e}")))?;
        let artifact = B64
            .decode(&self.artifact)
            .map_err(|_| malformed("artifact"))?;
        if artifact.len() as u64 != manifest.artifact_len {
            return Err(BundleError::ArtifactMismatch(format!(
                "{} bytes, the manifest says {}",
                artifact.len(),
                manifest.artifact_len
            )));
        }
        let digest = sha256_hex(&artifact);
        if digest != manifest.artifact_sha256 {
            return Err(BundleError::ArtifactMismatch(format!(
                "SHA-256 {digest}, the manifest says {}",
                manifest.artifact_sha256
            )));
        }
        Ok((manifest, artifact))
    }

    pub fn from_json(bytes: &[u8]) -> Result<SdkBundle, BundleError> {
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("not an even-length hex string".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// The generated module's ABI. Memory layout and error codes are fixed here;
/// the builder places data and code to match, the runtime reads them back.
pub mod abi {
    use indexmap::IndexMap;
    use serde::{Deserialize, Serialize};

    use crate::schema::FieldDef;
    use crate::Role;

    /// The data a module carries about itself, as JSON at `fg_schema_ptr`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ModuleSchema {
        pub sdk_version: String,
        pub role: Role,
        pub streams: Vec<ModuleStream>,
    }

    /// A stream the module can encode; field order is input-slot order.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ModuleStream {
        pub name: String,
        pub fields: IndexMap<String, FieldDef>,
    }

    /// Module of every host import.
    pub const IMPORT_MODULE: &str = "fleetgate";

    // Exports every module has.
    pub const MEMORY: &str = "memory";
    /// `() -> i32`: where the schema JSON (streams, fields, bounds, role) starts.
    pub const SCHEMA_PTR: &str = "fg_schema_ptr";
    pub const SCHEMA_LEN: &str = "fg_schema_len";
    /// `() -> i32`: the field slots the host fills before encoding.
    pub const INPUT_PTR: &str = "fg_input_ptr";
    /// `() -> i32`: where the host puts text (field values, SQL, arguments).
    pub const TEXT_PTR: &str = "fg_text_ptr";
    pub const TEXT_CAP: &str = "fg_text_cap";
    /// `() -> i32`: where an encoded record is left.
    pub const OUTPUT_PTR: &str = "fg_output_ptr";

    // Ingest (every role): encode and validate, publish.
    /// `(stream: i32) -> i32`: encoded length, or a negative [`error`] code.
    pub const ENCODE: &str = "fg_encode";
    /// `(stream: i32) -> i32`: encodes, then hands the record to the host's
    /// publish import; 0, a negative [`error`] code, or the host's negative result.
    pub const PUBLISH: &str = "fg_publish";
    /// Import `(stream: i32, payload_ptr: i32, payload_len: i32) -> i32`.
    pub const HOST_PUBLISH: &str = "publish";

    // Extract.
    /// `(sql_ptr: i32, sql_len: i32) -> i32`; import of the same signature.
    pub const QUERY: &str = "fg_query";
    pub const HOST_QUERY: &str = "query";
    /// `(filter_ptr: i32, filter_len: i32) -> i32`; import of the same signature.
    pub const FOLLOW: &str = "fg_follow";
    pub const HOST_FOLLOW: &str = "follow";

    // Admin.
    /// `(op: i32, arg_ptr: i32, arg_len: i32) -> i32`; import of the same signature.
    pub const ADMIN: &str = "fg_admin";
    pub const HOST_ADMIN: &str = "admin";
    pub const ADMIN_REVOKE: i32 = 1;
    pub const ADMIN_ROLE_INGEST: i32 = 2;
    pub const ADMIN_ROLE_EXTRACT: i32 = 3;
    pub const ADMIN_ROLE_ADMIN: i32 = 4;

    /// Each field has a 16-byte input slot: byte 0 present (0/1); bytes 4..8
    /// text length; bytes 8..16 the i64/f64 value, the bool, or the text's
    /// address (u32).
    pub const SLOT_SIZE: u32 = 16;
    /// Streams with more declared fields than this get no SDK encoder.
    pub const MAX_FIELDS: u32 = 64;

    /// Negative results: `-((field + 1) << 4 | reason)`, field 0-based.
    pub mod error {
        pub const MISSING: i32 = 1;
        pub const BELOW_MIN: i32 = 2;
        pub const ABOVE_MAX: i32 = 3;
        pub const NOT_FINITE: i32 = 4;
        pub const NOT_IN_ENUM: i32 = 5;
        /// Text outside the text area, or the record does not fit the output.
        pub const TOO_LONG: i32 = 6;
        pub const NUL_IN_TEXT: i32 = 7;
        /// Whole-call errors (field part 0).
        pub const UNKNOWN_STREAM: i32 = 8;
        pub const BAD_ARGUMENT: i32 = 9;

        pub fn code(field: u32, reason: i32) -> i32 {
            -((((field + 1) << 4) as i32) | reason)
        }

        /// An error about the whole call rather than one field.
        pub fn whole(reason: i32) -> i32 {
            -reason
        }

        /// Splits a negative result into (field index if any, reason).
        pub fn split(result: i32) -> (Option<u32>, i32) {
            let code = -result;
            let field = (code >> 4) as u32;
            ((field > 0).then(|| field - 1), code & 0xf)
        }

        pub fn describe(reason: i32) -> &'static str {
            match reason {
                MISSING => "is required",
                BELOW_MIN => "is below the minimum",
                ABOVE_MAX => "is above the maximum",
                NOT_FINITE => "is not a finite number",
                NOT_IN_ENUM => "is not one of the allowed values",
                TOO_LONG => "does not fit",
                NUL_IN_TEXT => "contains a NUL character",
                UNKNOWN_STREAM => "unknown stream",
                BAD_ARGUMENT => "bad argument",
                _ => "unknown error",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn a_bundle_opens_only_untampered_and_with_the_right_key() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let platform = TokenSigner::from_pkcs8(pkcs8.as_ref()).unwrap();
        let artifact = b"\0asm\x01\0\0\0".to_vec();
        let manifest = Manifest {
            device_id: "t1".into(),
            role: Role::Ingest,
            sdk_version: SDK_VERSION.into(),
            target: Target::Wasm,
            artifact_sha256: sha256_hex(&artifact),
            artifact_len: artifact.len() as u64,
            wasmtime_compat: None,
            schema_sha256: sha256_hex(b"{}"),
            nonce: None,
            issued_at: 1,
            expires_at: 2,
        };
        let bundle = SdkBundle::seal(&manifest, &artifact, &platform);
        let (opened, bytes) = bundle.open(&platform.public_key()).unwrap();
        assert_eq!((opened, bytes), (manifest.clone(), artifact.clone()));

        assert_eq!(
            bundle.open(key().public_key().as_ref()).unwrap_err(),
            BundleError::BadSignature
        );
        let mut other = bundle.clone();
        other.artifact = B64.encode(b"\0asm\x01\0\0\x01");
        assert!(matches!(
            other.open(&platform.public_key()),
            Err(BundleError::ArtifactMismatch(_))
        ));
        let mut truncated = bundle.clone();
        truncated.artifact = B64.encode(&artifact[..4]);
        assert!(matches!(
            truncated.open(&platform.public_key()),
            Err(BundleError::ArtifactMismatch(_))
        ));
        let mut relabeled = manifest;
        relabeled.role = Role::Admin;
        let mut forged = bundle;
        forged.manifest = B64.encode(serde_json::to_vec(&relabeled).unwrap());
        assert_eq!(
            forged.open(&platform.public_key()).unwrap_err(),
            BundleError::BadSignature
        );
    }

    #[test]
    fn a_handshake_verifies_only_with_the_signers_key() {
        let device = key();
        let claims = HandshakeClaims {
            device_id: "t1".into(),
            device_type: "thermostat".into(),
            fingerprint: "fw-1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            secure_transfer: false,
            sdk_version: SDK_VERSION.into(),
            target: Some(Target::Wasm),
            nonce: "n".into(),
            timestamp_ms: 5,
        };
        let signed = SignedHandshake::sign(&claims, &device);
        assert_eq!(signed.verify(device.public_key().as_ref()).unwrap(), claims);
        assert!(signed.verify(key().public_key().as_ref()).is_err());
        let mut altered = claims.clone();
        altered.device_id = "t2".into();
        let forged = SignedHandshake {
            claims: B64URL.encode(serde_json::to_vec(&altered).unwrap()),
            signature: signed.signature.clone(),
        };
        assert!(forged.verify(device.public_key().as_ref()).is_err());
        assert_eq!(forged.unverified_claims().unwrap(), altered);
    }

    #[test]
    fn error_codes_round_trip() {
        let code = abi::error::code(3, abi::error::ABOVE_MAX);
        assert!(code < 0);
        assert_eq!(abi::error::split(code), (Some(3), abi::error::ABOVE_MAX));
        let code = abi::error::whole(abi::error::UNKNOWN_STREAM);
        assert_eq!(abi::error::split(code), (None, abi::error::UNKNOWN_STREAM));
    }
}
