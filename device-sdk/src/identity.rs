//! A device's Ed25519 identity: `device.key` (PKCS#8, mode 0600) and
//! `device.pub` (hex), the latter registered with `fleetgate device add
//! --public-key`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fleetgate_protocol::sdk::{from_hex, hex, HandshakeClaims, SignedHandshake};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

pub struct DeviceKey {
    pair: Ed25519KeyPair,
}

pub const PRIVATE_FILE: &str = "device.key";
pub const PUBLIC_FILE: &str = "device.pub";

impl DeviceKey {
    /// Makes a key pair in `dir`; refuses to overwrite an existing one.
    pub fn generate(dir: &Path) -> Result<DeviceKey, String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "cannot generate a key pair".to_string())?;
        let private = dir.join(PRIVATE_FILE);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&private)
            .map_err(|e| format!("cannot create {}: {e}", private.display()))?;
        file.write_all(pkcs8.as_ref())
            .and_then(|_| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", private.display()))?;
        let key = DeviceKey::from_pkcs8(pkcs8.as_ref())?;
        fs::write(dir.join(PUBLIC_FILE), format!("{}\n", key.public_hex()))
            .map_err(|e| format!("cannot write the public key: {e}"))?;
        Ok(key)
    }

    /// Loads `device.key` from `dir`.
    pub fn load(dir: &Path) -> Result<DeviceKey, String> {
        let path = dir.join(PRIVATE_FILE);
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        DeviceKey::from_pkcs8(&bytes)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<DeviceKey, String> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|pair| DeviceKey { pair })
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))
    }

    /// Signs handshake claims with this device's key.
    pub fn sign_handshake(&self, claims: &HandshakeClaims) -> SignedHandshake {
        SignedHandshake::sign(claims, &self.pair)
    }

    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }
}

/// Reads a hex public key file (`device.pub`, `platform.pub`).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    from_hex(&text)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| format!("{} does not hold a hex Ed25519 public key", path.display()))
}
