//! Loading the sidecar's settings: the YAML config file, `GEO_*` environment and flag
//! overrides, and the key files it references.
//!
//! Every problem is a [`SettingsError`] naming the file and the field; `main` prints it on one
//! line and exits with status 2 (never a panic or a backtrace).

use geoforge_crds::auth::{KeyRing, SigningKey};
use geoforge_crds::config::{ConfigError, SidecarConfig};
use std::path::{Path, PathBuf};

/// Everything a sidecar needs to start.
pub struct Settings {
    pub config: SidecarConfig,
    pub config_file: PathBuf,
    /// This site's signing key.
    pub signing_key: SigningKey,
    /// Keys trusted to sign tokens: the configured peers plus this site's own key
    /// (the operator signs `admin` tokens with it).
    pub keyring: KeyRing,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{file}: cannot read: {reason}")]
    Unreadable { file: String, reason: String },
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
}

/// Overrides from flags or the environment, applied over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub service_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub log_level: Option<String>,
    pub instance: Option<String>,
}

impl Settings {
    /// Reads and checks the config file and the key files it references.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Settings, SettingsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Unreadable {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let mut config = SidecarConfig::from_yaml(&text, &file)?;
        if let Some(v) = &overrides.service_listen {
            config.listen.service = v.clone();
        }
        if let Some(v) = &overrides.admin_listen {
            config.listen.admin = v.clone();
        }
        if let Some(v) = &overrides.log_level {
            config.log.level = v.clone();
        }
        if let Some(v) = &overrides.instance {
            config.instance = Some(v.clone());
        }
        let field = |field: &str, message: String| SettingsError::Field {
            file: file.clone(),
            field: field.to_string(),
            message,
        };

        check_secret_file(&config.keys.private_key_file)
            .map_err(|m| field("keys.privateKeyFile", m))?;
        let signing_key =
            SigningKey::from_pem_file(&config.keys.kid, &config.keys.private_key_file)
                .map_err(|m| field("keys.privateKeyFile", m))?;
        let mut keyring = KeyRing::new(config.keys.max_token_validity);
        keyring
            .add_ed25519(
                &config.keys.kid,
                &config.site_id,
                signing_key.public_key.as_deref().unwrap_or_default(),
            )
            .map_err(|m| field("keys.privateKeyFile", m))?;
        for (i, k) in config.keys.trusted.iter().enumerate() {
            if let Some(f) = &k.secret_file {
                check_secret_file(f)
                    .map_err(|m| field(&format!("keys.trusted[{i}].secretFile"), m))?;
            }
            keyring
                .add_configured(k)
                .map_err(|m| field(&format!("keys.trusted[{i}]"), m))?;
        }
        if let Some(f) = config
            .forge
            .as_ref()
            .and_then(|f| f.hook_token_file.as_ref())
        {
            check_secret_file(f).map_err(|m| field("forge.hookTokenFile", m))?;
        }
        if let Some(f) = config
            .forge
            .as_ref()
            .and_then(|f| f.embedded.as_ref())
            .and_then(|e| e.credentials_file.as_ref())
        {
            check_secret_file(f).map_err(|m| field("forge.embedded.credentialsFile", m))?;
        }
        Ok(Settings {
            config,
            config_file: path.to_path_buf(),
            signing_key,
            keyring,
        })
    }
}

/// A secret file must be readable and not readable by everyone. Only the world bits are
/// checked, after following symlinks: Kubernetes mounts Secrets as group-readable symlinks.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "{} is readable by everyone: chmod o-r (0600 or 0640)",
            path.display()
        ));
    }
    std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(())
}

/// Reads a secret file's content, trimmed of trailing whitespace.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim_end().to_string())
}
