//! `geo-sidecar`: the geoforge data plane. See `geo-sidecar --help`.

use clap::{Parser, Subcommand};
use geo_sidecar::settings::{Overrides, Settings};
use std::path::PathBuf;
use std::process::ExitCode;

// The proxy path allocates many small, short-lived objects per request (header maps, body
// channels, futures); glibc's malloc spent ~9% of the CPU there (bench/proxy.sh profile),
// mimalloc about a third of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The geoforge sidecar: fronts the forge and serves the Geo API on a primary; serves reads
/// locally, proxies the rest and replicates on a secondary.
#[derive(Parser, Debug)]
#[command(name = "geo-sidecar", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Config file (YAML; see the README's configuration reference).
    #[arg(
        long,
        short,
        env = "GEO_CONFIG",
        default_value = "/etc/geoforge/sidecar.yaml"
    )]
    config: PathBuf,
    /// Override `listen.service` (client traffic and the Geo API), e.g. 127.0.0.1:8080.
    #[arg(long, env = "GEO_LISTEN")]
    listen: Option<String>,
    /// Override `listen.admin` (health, metrics, status), e.g. 127.0.0.1:8081.
    #[arg(long, env = "GEO_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Override `log.level` (a tracing filter such as `info` or `geo_sidecar=debug`).
    #[arg(long, env = "GEO_LOG")]
    log_level: Option<String>,
    /// Override `instance` (defaults to the host name, the pod name in Kubernetes).
    #[arg(long, env = "GEO_INSTANCE")]
    instance: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (the default).
    Run(RunArgs),
    /// Check a config file and its key files, then exit (status 2 on a problem).
    Check(RunArgs),
    /// Write a new Ed25519 key pair: the private key to FILE (mode 0600), the public key
    /// (base64url, as GeoSite.spec.publicKeys takes it) to stdout.
    Keygen {
        /// Where to write the PKCS#8 PEM private key; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
        /// Key id to print alongside (`<site>.<n>`).
        #[arg(long)]
        kid: Option<String>,
    },
    /// Print this instance's replication status (`/-/geo/status` on the admin port, signed
    /// with the site's own key as the operator does).
    Status(RunArgs),
    /// Hash a password for the embedded forge's credentials file (reads it from stdin).
    HashPassword {
        /// The user name to print in front of the hash.
        #[arg(long)]
        user: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run, false),
        Some(Command::Run(args)) => run(args, false),
        Some(Command::Check(args)) => run(args, true),
        Some(Command::Status(args)) => status(args),
        Some(Command::Keygen { out, kid }) => keygen(&out, kid.as_deref()),
        Some(Command::HashPassword { user }) => {
            let mut pw = String::new();
            if std::io::stdin().read_line(&mut pw).is_err() {
                eprintln!("geo-sidecar: cannot read the password from stdin");
                return ExitCode::from(2);
            }
            println!(
                "{user}:{}",
                geo_sidecar::forge::hash_password(pw.trim_end_matches(['\r', '\n']))
            );
            ExitCode::SUCCESS
        }
    }
}

fn run(args: RunArgs, check_only: bool) -> ExitCode {
    let overrides = Overrides {
        service_listen: args.listen.clone(),
        admin_listen: args.admin_listen.clone(),
        log_level: args.log_level.clone(),
        instance: args.instance.clone(),
    };
    let settings = match Settings::load(&args.config, &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("geo-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_tracing(&settings.config.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("geo-sidecar: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(geo_sidecar::app::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("geo-sidecar: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn status(args: RunArgs) -> ExitCode {
    let overrides = Overrides {
        admin_listen: args.admin_listen.clone(),
        ..Default::default()
    };
    let settings = match Settings::load(&args.config, &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("geo-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = &settings.config;
    let addr = cfg.listen.admin.replace("0.0.0.0", "127.0.0.1");
    let auth = settings.signing_key.authorization(
        &cfg.site_id,
        &geoforge_crds::auth::TokenData::scope(geoforge_crds::auth::Scope::Admin),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async move {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let req = http::Request::get(format!("http://{addr}/-/geo/status"))
            .header(http::header::AUTHORIZATION, auth)
            .body(http_body_util::Empty::new())?;
        let resp =
            tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req)).await??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    });
    match result {
        Ok((status, body)) if status.is_success() => {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                Err(_) => println!("{}", String::from_utf8_lossy(&body)),
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "geo-sidecar: status answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("geo-sidecar: cannot read status: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(log: &geoforge_crds::config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        geoforge_crds::config::LogFormat::Json => builder.json().init(),
        geoforge_crds::config::LogFormat::Text => builder.init(),
    }
}

fn keygen(out: &std::path::Path, kid: Option<&str>) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = geoforge_crds::auth::generate_key();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out);
    match file.and_then(|mut f| {
        f.write_all(key.private_pem.as_bytes())
            .and_then(|_| f.sync_all())
    }) {
        Ok(()) => {
            match kid {
                Some(k) => println!("kid: {k}\nkey: {}", key.public_key),
                None => println!("{}", key.public_key),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("geo-sidecar: cannot write {}: {e}", out.display());
            ExitCode::from(2)
        }
    }
}
