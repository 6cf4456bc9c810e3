//! The SDK handshake as the server checks it (`Handshakes::verify`, over a
//! registry holding one device) and the signed bundle as a device opens it
//! (`SdkBundle::open`).
//!
//! Input: one byte of mode, then the rest.
//! - mode 0: the body of `POST /v1/handshake`, as the HTTP route reads it.
//! - mode 1: the handshake's claims JSON, signed here with the registered
//!   device's key, so the checks behind the signature are reached; with
//!   bit 2 set, an object's `nonce` is replaced by a fresh one the server
//!   issued (the nonce's HMAC cannot be guessed).
//! - mode 2: an SDK bundle's JSON, as a device receives it.
//! - mode 3: a manifest's JSON, a NUL, and the artifact, sealed here with
//!   the platform key; with bit 2 set, the manifest's `artifact_len` and
//!   `artifact_sha256` are made to match the artifact. What opens must
//!   seal and open again to the same thing.

#![no_main]

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use fleetgate_fuzz::{handshakes, platform, runtime, NOW_MS};
use fleetgate_protocol::sdk::{sha256_hex, BundleError, SdkBundle, SignedHandshake, Target};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The domain separation strings of `fleetgate_protocol::sdk`.
const HANDSHAKE_CONTEXT: &[u8] = b"fleetgate-handshake-v1\n";
const MANIFEST_CONTEXT: &[u8] = b"fleetgate-sdk-manifest-v1\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode & 0b11 {
        0 => {
            if let Ok(signed) = serde_json::from_slice::<SignedHandshake>(rest) {
                verify(&signed);
            }
        }
        1 => {
            let fixture = handshakes();
            let mut json = rest.to_vec();
            if mode & 0b100 != 0 {
                if let Ok(Value::Object(mut claims)) = serde_json::from_slice(rest) {
                    let (nonce, _) = fixture.handshakes.issue_nonce(NOW_MS).expect("nonce");
                    claims.insert("nonce".into(), Value::String(nonce));
                    json = serde_json::to_vec(&claims).expect("claims serialize");
                }
            }
            let signature = fixture.key.sign(&[HANDSHAKE_CONTEXT, &json].concat());
            let signed = SignedHandshake {
                claims: B64URL.encode(&json),
                signature: B64URL.encode(signature.as_ref()),
            };
            verify(&signed);
        }
        2 => {
            if let Ok(bundle) = SdkBundle::from_json(rest) {
                let _ = bundle.open(&platform().public_key());
            }
        }
        _ => {
            let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let (mut manifest, artifact) =
                (rest[..split].to_vec(), &rest[(split + 1).min(rest.len())..]);
            if mode & 0b100 != 0 {
                if let Ok(Value::Object(mut m)) = serde_json::from_slice(&manifest) {
                    m.insert("artifact_len".into(), artifact.len().into());
                    m.insert("artifact_sha256".into(), sha256_hex(artifact).into());
                    manifest = serde_json::to_vec(&m).expect("manifest serializes");
                }
            }
            let signer = platform();
            let bundle = SdkBundle {
                manifest: B64.encode(&manifest),
                signature: B64.encode(signer.sign_bytes(&[MANIFEST_CONTEXT, &manifest].concat())),
                artifact: B64.encode(artifact),
            };
            match bundle.open(&signer.public_key()) {
                Ok((opened, bytes)) => {
                    assert_eq!(bytes, artifact);
                    let again = SdkBundle::seal(&opened, artifact, signer);
                    let json = serde_json::to_vec(&again).expect("bundle serializes");
                    let reread = SdkBundle::from_json(&json).expect("a sealed bundle reads");
                    assert_eq!(reread.open(&signer.public_key()), Ok((opened, bytes)));
                }
                Err(BundleError::BadSignature) => panic!("the platform's own signature"),
                Err(_) => {}
            }
        }
    }
});

/// Checks a handshake as `POST /v1/handshake` does, at a fixed time.
fn verify(signed: &SignedHandshake) {
    let fixture = handshakes();
    let verified = runtime().block_on(fixture.handshakes.verify(signed, NOW_MS));
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("handshake: {verified:?}");
    }
    if let Ok((claims, device)) = verified {
        assert_eq!(claims.device_id, device.id);
        let _ = claims
            .target
            .unwrap_or_else(|| Target::native_for_arch(&claims.arch));
    }
}
