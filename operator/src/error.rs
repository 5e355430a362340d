//! The reconcilers' error type. Each variant has a metric label (`reason` in
//! `geoforge_operator_reconcile_errors_total`).

/// Why a reconcile failed. Every error is retried with a per-object backoff (see
/// [`crate::controller::Backoff`]); none crashes the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    /// Another writer changed the object since we read it (HTTP 409): retried soon.
    #[error("update conflict on {0}: retrying")]
    Conflict(String),
    /// The spec cannot be acted on (two primaries, …); also set as a condition.
    #[error("{reason}: {message}")]
    Invalid { reason: String, message: String },
    /// The site's key Secret exists but cannot be used. It is never rewritten by the operator.
    #[error("key Secret {secret}: {message}")]
    KeySecret { secret: String, message: String },
    #[error("object has no namespace")]
    MissingNamespace,
    /// The `Replicable` cache stopped before it was filled (shutting down).
    #[error("the Replicable cache is not available")]
    CacheNotReady,
}

impl Error {
    /// The `reason` label of the error metric.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => format!("api_{}", s.code),
            Error::Kube(_) => "kube".into(),
            Error::Conflict(_) => "conflict".into(),
            Error::Invalid { reason, .. } => format!("invalid_{}", reason.to_lowercase()),
            Error::KeySecret { .. } => "key_secret".into(),
            Error::MissingNamespace => "missing_namespace".into(),
            Error::CacheNotReady => "cache_not_ready".into(),
        }
    }

    /// Whether a retry soon is likely to succeed (conflicts), as opposed to needing a change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Conflict(_))
    }
}

/// Maps a 409 from the API server to [`Error::Conflict`].
pub fn conflict_aware(what: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |e| match &e {
        kube::Error::Api(s) if s.code == 409 => Error::Conflict(what.to_string()),
        _ => Error::Kube(e),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
