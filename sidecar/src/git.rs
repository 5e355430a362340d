//! Running `git`.

use std::path::Path;
use std::process::Stdio;
use tokio::process::Command;

/// The git binary (`GEO_GIT` overrides `git` on PATH; tests use it to point at a specific git).
pub fn binary() -> String {
    std::env::var("GEO_GIT").unwrap_or_else(|_| "git".to_string())
}

/// A `git` command run in `dir` with a clean environment for our purposes: no user or system
/// config surprises, no prompts, and `safe.directory` so replicas owned by another uid (a
/// volume) are readable.
pub fn command(dir: &Path) -> Command {
    let mut c = Command::new(binary());
    c.current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Whether `git --version` runs; a missing git is a start-up error, not a runtime 500.
pub async fn check_available() -> Result<String, String> {
    let out = Command::new(binary())
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            format!(
                "cannot run `{}` ({e}): install git or set GEO_GIT",
                binary()
            )
        })?;
    if !out.status.success() {
        return Err(format!("`{} --version` failed", binary()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
