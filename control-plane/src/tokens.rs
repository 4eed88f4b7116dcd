//! Per-workload bootstrap tokens and bootstrap files (local mode).
//!
//! A token proves "I am workload ns/name" to `Certify`. Tokens live in
//! `<state>/tokens/<ns>_<name>.token` (mode 0600) and survive restarts; the bootstrap file a
//! sidecar starts from is `<state>/bootstrap/<ns>_<name>.json` (mode 0600).

use std::path::{Path, PathBuf};

use meshflow_api::Bootstrap;
use meshflow_policies::mesh::MeshFile;

use crate::ca::{write_private, CaError};

/// File stem for a workload key `ns/name`.
pub fn file_stem(key: &str) -> String {
    key.replace('/', "_")
}

/// Path of the bootstrap file for workload `key` under `state_dir`.
pub fn bootstrap_path(state_dir: &Path, key: &str) -> PathBuf {
    state_dir
        .join("bootstrap")
        .join(format!("{}.json", file_stem(key)))
}

/// Token store rooted at `<state>/tokens`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// Opens (creating) `<state_dir>/tokens`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("tokens");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.token", file_stem(key)))
    }

    /// The token of workload `key`, created (32 random bytes, hex) if missing.
    ///
    /// # Errors
    /// [`CaError::Io`].
    pub fn get_or_create(&self, key: &str) -> Result<String, CaError> {
        let path = self.path(key);
        if let Ok(token) = std::fs::read_to_string(&path) {
            if !token.trim().is_empty() {
                return Ok(token.trim().to_string());
            }
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        write_private(&path, token.as_bytes())?;
        Ok(token)
    }

    /// Whether `token` is workload `key`'s token (constant-time over the token bytes).
    pub fn verify(&self, key: &str, token: &str) -> bool {
        let Ok(expected) = std::fs::read_to_string(self.path(key)) else {
            return false;
        };
        let expected = expected.trim().as_bytes();
        let given = token.as_bytes();
        expected.len() == given.len()
            && !expected.is_empty()
            && expected
                .iter()
                .zip(given)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Writes a bootstrap file for every workload of `mesh`; the `builtin` (coordinator)
    /// workload's also carries `coordinator_secret` as its `appAuthSecret`.
    ///
    /// # Errors
    /// [`CaError::Io`].
    pub fn write_bootstraps(
        &self,
        state_dir: &Path,
        mesh: &MeshFile,
        control_plane: &str,
        server_name: &str,
        trust_bundle_pem: &str,
        coordinator_secret: Option<&str>,
    ) -> Result<(), CaError> {
        let dir = state_dir.join("bootstrap");
        std::fs::create_dir_all(&dir).map_err(|source| CaError::Io {
            path: dir.clone(),
            source,
        })?;
        for w in &mesh.spec.workloads {
            let Ok(id) = w.spiffe_id(&mesh.spec.trust_domain) else {
                continue;
            };
            let bootstrap = Bootstrap {
                control_plane: control_plane.to_string(),
                control_plane_server_name: server_name.to_string(),
                trust_bundle_pem: trust_bundle_pem.to_string(),
                workload: w.key(),
                spiffe_id: id.uri(),
                token: self.get_or_create(&w.key())?,
                app_auth_secret: coordinator_secret
                    .filter(|_| w.app.builtin.is_some())
                    .map(str::to_string),
                token_file: None,
            };
            let json = serde_json::to_vec_pretty(&bootstrap).expect("bootstrap serializes");
            write_private(&bootstrap_path(state_dir, &w.key()), &json)?;
        }
        Ok(())
    }
}
