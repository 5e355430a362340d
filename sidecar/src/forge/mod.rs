//! The embedded forge: `git http-backend` as CGI over a directory of bare repositories,
//! with optional HTTP basic auth, and push detection. Owner: proxy work (issue 3).
//!
//! **Repository root** (`GIT_PROJECT_ROOT`): `forge.embedded.repositoriesDir` when set, else
//! the root of the first `repository` replicable (`storageRoot/sourcePath`, so the URLs the
//! forge serves are the ones [`crate::items::RepoMapper`] maps to item ids), else
//! `storageRoot`.
//!
//! **Access**: a credentials file of `user:$sha256$<salt>$<hex>` lines (see
//! `geo-sidecar hash-password`). Reads are anonymous when `anonymousRead` is set or the
//! repository (its item id, or its path under the root) is in `publicRepositories`; every
//! other request needs a valid user. Pushes always need a user (`401` with
//! `WWW-Authenticate: Basic`). The authenticated user is passed as `REMOTE_USER`, which is
//! also what enables `git-receive-pack` in `git http-backend`.

pub mod cgi;
pub mod credentials;
pub mod report_status;

pub use credentials::hash_password;

use crate::context::{PushSink, SiteContext};
use crate::items::RepoMapper;
use axum::body::Body;
use base64::Engine;
use http::{HeaderMap, Request, Response, StatusCode, header};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long a verified user/password pair is remembered (hash checks are deliberately slow).
const AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// The embedded forge of a primary (or disabled) site.
pub struct EmbeddedForge {
    root: PathBuf,
    git: String,
    anonymous_read: bool,
    public: HashSet<String>,
    mapper: RepoMapper,
    credentials: Option<Credentials>,
    sink: Option<Arc<dyn PushSink>>,
}

struct Credentials {
    file: PathBuf,
    /// user → stored hash, reloaded when the file's mtime changes.
    users: Mutex<(Option<SystemTime>, HashMap<String, String>)>,
    /// sha256(user:password) → when it was last verified.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

/// Whether a request is a push (needs a user whatever the read policy says).
pub fn is_push(path: &str, query: Option<&str>) -> bool {
    path.ends_with("/git-receive-pack")
        || query.is_some_and(|q| q.split('&').any(|kv| kv == "service=git-receive-pack"))
}

impl EmbeddedForge {
    /// Builds the forge from the site config; `None` when the config has no embedded forge.
    pub fn new(
        ctx: &SiteContext,
        sink: Option<Arc<dyn PushSink>>,
    ) -> anyhow::Result<Option<EmbeddedForge>> {
        let cfg = &ctx.config;
        let Some(emb) = cfg.forge.as_ref().and_then(|f| f.embedded.as_ref()) else {
            return Ok(None);
        };
        let root = emb
            .repositories_dir
            .clone()
            .or_else(|| {
                cfg.replicables
                    .iter()
                    .find(|r| r.data_type == geoforge_crds::replicable::DataType::Repository)
                    .map(|r| crate::items::replicable_root(cfg, r))
            })
            .unwrap_or_else(|| cfg.storage_root.clone());
        let credentials = match &emb.credentials_file {
            Some(file) => {
                let users = load_credentials(file)?;
                Some(Credentials {
                    file: file.clone(),
                    users: Mutex::new((mtime(file), users)),
                    verified: Mutex::new(HashMap::new()),
                })
            }
            None => None,
        };
        let git = emb
            .git_binary
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(crate::git::binary);
        tracing::info!(root = %root.display(), anonymous_read = emb.anonymous_read,
            auth = credentials.is_some(), "embedded forge: git http-backend");
        Ok(Some(EmbeddedForge {
            root,
            git,
            anonymous_read: emb.anonymous_read,
            public: emb
                .public_repositories
                .iter()
                .map(|s| s.trim_matches('/').to_string())
                .collect(),
            mapper: RepoMapper::new(cfg).map_err(anyhow::Error::msg)?,
            credentials,
            sink,
        }))
    }

    /// Serves one request. `client` is the client address (`REMOTE_ADDR`).
    pub async fn serve(&self, req: Request<Body>, client: IpAddr) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let Some(path_info) = safe_path_info(&path) else {
            return plain(StatusCode::BAD_REQUEST, "bad repository path");
        };
        let user = match basic_auth(req.headers()) {
            Some((u, p)) => match self.check_password(&u, &p).await {
                true => Some(u),
                false => return unauthorized("invalid user name or password"),
            },
            None => None,
        };
        let push = is_push(&path, query.as_deref());
        if user.is_none() && (push || !self.anonymous_allowed(&path_info)) {
            return unauthorized(if push {
                "pushing needs a user"
            } else {
                "authentication required"
            });
        }
        let sink = if push && req.method() == http::Method::POST {
            self.sink.clone()
        } else {
            None
        };
        let params = cgi::CgiParams {
            git: &self.git,
            root: &self.root,
            path_info: &path_info,
            query: query.as_deref().unwrap_or(""),
            remote_addr: client,
            remote_user: user.as_deref(),
        };
        let resp = cgi::run(params, req).await;
        match sink {
            Some(sink) if resp.status() == StatusCode::OK => {
                let (parts, body) = resp.into_parts();
                Response::from_parts(
                    parts,
                    Body::new(report_status::PushDetectBody::new(body, sink, path)),
                )
            }
            _ => resp,
        }
    }

    fn anonymous_allowed(&self, path_info: &str) -> bool {
        if self.anonymous_read {
            return true;
        }
        if self.public.is_empty() {
            return false;
        }
        if let Some(t) = self.mapper.map(path_info)
            && self.public.contains(&t.item_id)
        {
            return true;
        }
        // Not mapped by a replicable: the repository's path under the root.
        let repo = match path_info.find(".git/") {
            Some(i) => &path_info[..i + 4],
            None => path_info,
        };
        let repo = repo.trim_matches('/');
        self.public.contains(repo) || self.public.contains(&format!("{repo}.git"))
    }

    async fn check_password(&self, user: &str, password: &str) -> bool {
        let Some(c) = &self.credentials else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(format!("{user}:{password}").as_bytes()).into();
        {
            let mut v = c.verified.lock().expect("auth cache");
            v.retain(|_, t| t.elapsed() < AUTH_CACHE_TTL);
            if v.contains_key(&key) && c.current_hash(user).is_some() {
                return true;
            }
        }
        let Some(stored) = c.current_hash(user) else {
            return false;
        };
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || credentials::verify_password(&stored, &pw))
            .await
            .unwrap_or(false);
        if ok {
            c.verified
                .lock()
                .expect("auth cache")
                .insert(key, Instant::now());
        }
        ok
    }
}

impl Credentials {
    /// The stored hash of `user`, re-reading the file when it changed.
    fn current_hash(&self, user: &str) -> Option<String> {
        let mut g = self.users.lock().expect("credentials");
        let m = mtime(&self.file);
        if m != g.0 {
            match load_credentials(&self.file) {
                Ok(users) => {
                    *g = (m, users);
                    self.verified.lock().expect("auth cache").clear();
                }
                Err(e) => tracing::warn!("{e:#}; keeping the previous credentials"),
            }
        }
        g.1.get(user).cloned()
    }
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_credentials(file: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("forge.embedded.credentialsFile {}: {e}", file.display()))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((u, h)) = line.split_once(':') else {
            anyhow::bail!(
                "forge.embedded.credentialsFile {} line {}: expected user:$sha256$salt$hex",
                file.display(),
                i + 1
            );
        };
        users.insert(u.to_string(), h.to_string());
    }
    Ok(users)
}

/// `Authorization: Basic` user and password.
fn basic_auth(h: &HeaderMap) -> Option<(String, String)> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The decoded `PATH_INFO`, refused when it could leave the repository root.
fn safe_path_info(path: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?
        .into_owned();
    if !decoded.starts_with('/')
        || decoded.contains(['\0', '\\'])
        || decoded.split('/').any(|s| s == ".." || s == ".")
    {
        return None;
    }
    Some(decoded)
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    crate::http_util::error(status, msg, false)
}

fn unauthorized(msg: &str) -> Response<Body> {
    let mut r = plain(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"geoforge\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_detection_and_paths() {
        assert!(is_push("/g/p.git/git-receive-pack", None));
        assert!(is_push(
            "/g/p.git/info/refs",
            Some("service=git-receive-pack")
        ));
        assert!(!is_push(
            "/g/p.git/info/refs",
            Some("service=git-upload-pack")
        ));
        assert_eq!(
            safe_path_info("/g/p%20q.git/info/refs").as_deref(),
            Some("/g/p q.git/info/refs")
        );
        assert!(safe_path_info("/g/%2e%2e/x.git/info/refs").is_none());
        assert!(safe_path_info("/g/../x.git").is_none());
    }
}
