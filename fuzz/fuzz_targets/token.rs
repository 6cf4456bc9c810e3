//! Token parsing and verification (`fg1.<claims>.<signature>`).
//!
//! Input: one byte of mode, then the rest. Mode bit 0 clear: the rest is a
//! token as a client presents it (MQTT password, bearer token). Set: the
//! rest is the claims part, which the target signs with the platform key,
//! so what lies behind a valid signature (base64, JSON, the validity
//! window) is reached too. Signing what verified again must give the same
//! claims, and no other key may verify the platform's signature.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use fleetgate_fuzz::{platform, NOW};
use fleetgate_protocol::token::claimed_subject;
use fleetgate_protocol::{TokenError, TokenVerifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let signer = platform();
    let verifier = signer.verifier();
    let token = if mode & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        token.to_string()
    } else {
        // As `TokenSigner::sign` builds it, around the fuzzed claims.
        let mut token = String::from("fg1.");
        if mode & 2 == 0 {
            B64.encode_string(rest, &mut token);
        } else {
            // The claims part as given, base64 or not.
            token.push_str(&String::from_utf8_lossy(rest));
        }
        let signature = signer.sign_bytes(token.as_bytes());
        token.push('.');
        B64.encode_string(signature, &mut token);
        token
    };

    let verified = verifier.verify(&token, NOW);
    let signed = verifier.signed_claims(&token);
    let _ = claimed_subject(&token);
    match (&verified, &signed) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Ok(_), Err(e)) => panic!("verified, yet its signed claims are refused: {e}"),
        (Err(_), _) => {}
    }
    if mode & 1 == 1 && token.len() <= 4096 {
        assert_ne!(
            signed.as_ref().err(),
            Some(&TokenError::BadSignature),
            "the platform's own signature"
        );
    }
    if let Ok(claims) = &signed {
        // What the platform signs, it verifies, and nobody else's key does.
        let again = signer.sign(claims);
        assert_eq!(verifier.signed_claims(&again).as_ref(), Ok(claims));
        let stranger = TokenVerifier::new(vec![0x55; 32]);
        assert_eq!(
            stranger.signed_claims(&token).err(),
            Some(TokenError::BadSignature)
        );
    }
});
