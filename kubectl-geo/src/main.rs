//! `kubectl-geo`: put it on PATH and run `kubectl geo …` (kubectl finds `kubectl-*` plugins).

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kubectl_geo::cli::Cli::parse();
    let mut out = std::io::stdout();
    match kubectl_geo::cli::main_with(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
