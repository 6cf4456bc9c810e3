use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetgate_protocol::{Claims, Role, TokenSigner};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use ring::{hkdf, hmac};

/// The built-in administrator's device id.
pub const ADMIN_DEVICE: &str = "admin";
/// How long the bootstrap admin token lives.
pub const ADMIN_TOKEN_TTL_SECS: i64 = 10 * 365 * 24 * 3600;

/// The platform's signing key, kept in the data directory.
pub struct Platform {
    pub signer: TokenSigner,
    pub data_dir: PathBuf,
    /// Seals handshake nonces; see [`Platform::nonce_key`].
    nonce_key: hmac::Key,
}

impl Platform {
    /// Loads `<data>/platform.key`, creating it (mode 0600) on first start.
    /// Returns whether it was created.
    pub fn open(data_dir: &Path) -> Result<(Platform, bool), String> {
        fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
        let key_path = data_dir.join("platform.key");
        let (pkcs8, created) = match fs::read(&key_path) {
            Ok(bytes) => (bytes, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| "cannot generate the platform key".to_string())?;
                write_private(&key_path, pkcs8.as_ref())?;
                (pkcs8.as_ref().to_vec(), true)
            }
            Err(e) => return Err(format!("cannot read {}: {e}", key_path.display())),
        };
        let signer = TokenSigner::from_pkcs8(&pkcs8)?;
        Ok((
            Platform {
                signer,
                data_dir: data_dir.to_path_buf(),
                nonce_key: derive_nonce_key(&pkcs8),
            },
            created,
        ))
    }

    /// The HMAC key that seals handshake nonces. It is derived from the
    /// platform key, not generated at start, so that every broker holding
    /// `platform.key` (a cluster, or this one after a restart) recognises
    /// the nonces any of them issued. It cannot sign tokens or manifests.
    pub fn nonce_key(&self) -> hmac::Key {
        self.nonce_key.clone()
    }

    pub fn mint(&self, device_id: &str, role: Role, ttl_secs: i64, now: i64) -> String {
        self.signer.sign(&Claims {
            sub: device_id.to_string(),
            role,
            iat: now,
            exp: now + ttl_secs,
        })
    }

    /// Writes `<data>/platform.pub` (hex): what devices are flashed with to
    /// verify tokens and SDK manifests.
    pub fn save_public_key(&self) -> Result<(), String> {
        let path = self.data_dir.join("platform.pub");
        let hex = fleetgate_protocol::sdk::hex(&self.signer.public_key());
        std::fs::write(&path, format!("{hex}\n"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// Writes the admin token (mode 0600).
    pub fn save_admin_token(&self, token: &str) -> Result<(), String> {
        write_private(&self.admin_token_path(), format!("{token}\n").as_bytes())
    }
}

/// HKDF-SHA256 over the platform key's PKCS#8 bytes, with a label of its
/// own, so the nonce key reveals nothing about the signing key.
fn derive_nonce_key(pkcs8: &[u8]) -> hmac::Key {
    hkdf::Salt::new(hkdf::HKDF_SHA256, b"fleetgate handshake nonces v1")
        .extract(pkcs8)
        .expand(&[b"hmac-sha256"], hmac::HMAC_SHA256)
        .expect("HMAC-SHA256 key length is valid for HKDF-SHA256")
        .into()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // The mode above applies only to a new file; tighten an existing one too.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set permissions of {}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_private_key_once_and_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = Platform::open(dir.path()).unwrap();
        assert!(created);
        let mode = fs::metadata(dir.path().join("platform.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = Platform::open(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first.signer.public_key(), second.signer.public_key());
        // The same key file gives the same nonce key; another does not.
        let tag = |p: &Platform| hmac::sign(&p.nonce_key(), b"n").as_ref().to_vec();
        assert_eq!(tag(&first), tag(&second));
        let other = tempfile::tempdir().unwrap();
        assert_ne!(tag(&first), tag(&Platform::open(other.path()).unwrap().0));
    }
}
