//! The `oa-bypass` binary: parse the command line, load the manifest, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use oa_bypass::{app, app_for_workers, config::Config, init_logging, server, App, Logging, Tls};

/// The command line. `--check` and `--print-openapi` stay flags, as scripts and the image's
/// docs have them; the rest are subcommands.
#[derive(Debug, Parser)]
#[command(
    name = "oa-bypass",
    version,
    about = "A self-hosted passthrough gateway for the OpenAI API",
    after_help = "The manifest is --config PATH, else $OA_BYPASS_CONFIG, else ./routes.toml if \
                  present, else the copy built into this binary. Environment variables \
                  OA_BYPASS_<SECTION>__<KEY> override it, e.g. OA_BYPASS_SERVER__PORT=9000. \
                  RUST_LOG sets log levels (default: info)."
)]
struct Cli {
    /// The manifest (default: ./routes.toml, else the built-in one)
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate, print the route table and settings, exit 0 or 1
    #[arg(long, conflicts_with = "print_openapi")]
    check: bool,
    /// Write the OpenAPI document to stdout
    #[arg(long)]
    print_openapi: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
enum Command {
    /// GET /health on the local server (for container probes)
    Healthcheck,
    /// Read a key on stdin, print its access.allowed_key_hashes line
    HashKey,
    /// A team's named keys ([keys.NAME] in the manifest)
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
enum KeysCommand {
    /// Make a key for NAME: print it once, and the [keys.NAME] block with its hash
    New { name: String },
    /// Print each named key and what it may do (never a whole hash)
    List,
}

impl Cli {
    /// The command line, or clap's message and exit. `--config` goes anywhere, as it always
    /// has; `--check` and `--print-openapi` take no subcommand.
    fn parse_checked() -> Cli {
        let cli = Cli::parse();
        if let Err(err) = cli.checked() {
            err.exit();
        }
        cli
    }

    fn checked(&self) -> Result<(), clap::Error> {
        match (&self.command, self.check || self.print_openapi) {
            (Some(_), true) => Err(<Cli as clap::CommandFactory>::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--check and --print-openapi take no subcommand",
            )),
            _ => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    match cli.command {
        Some(Command::HashKey) => return hash_key(),
        Some(Command::Keys(KeysCommand::New { name })) => return new_key(&name),
        Some(Command::Keys(KeysCommand::List) | Command::Healthcheck) | None => {}
    }

    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("oa-bypass: invalid configuration:\n{err}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        // Building the app also checks what only the router and the HTTP client can tell.
        if let Err(err) = app(&config) {
            eprintln!("oa-bypass: invalid configuration:\n{err}");
            return ExitCode::FAILURE;
        }
        if let Err(err) = Tls::check(&config.server) {
            eprintln!("oa-bypass: invalid configuration:\n{err}");
            return ExitCode::FAILURE;
        }
        // The docs are built on first use when serving; a check builds them now, so an
        // unreadable openapi.schemas shows here.
        if config.openapi.enabled && config.openapi.schemas.is_some() {
            if let Err(err) = oa_bypass::openapi::document(&config) {
                eprintln!("oa-bypass: invalid configuration:\n{err}");
                return ExitCode::FAILURE;
            }
        }
        print!("{}", config.describe());
        println!("\nconfiguration OK");
        return ExitCode::SUCCESS;
    }

    if cli.print_openapi {
        let document = oa_bypass::openapi::document(&config).and_then(|document| {
            serde_json::to_string_pretty(&document)
                .map_err(|err| format!("cannot serialise the OpenAPI document: {err}"))
        });
        return match document {
            Ok(document) => {
                println!("{document}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("oa-bypass: {err}");
                ExitCode::FAILURE
            }
        };
    }

    if cli.command == Some(Command::Keys(KeysCommand::List)) {
        print!("{}", config.describe_keys());
        return ExitCode::SUCCESS;
    }

    let result = match cli.command {
        Some(Command::Healthcheck) => runtime().and_then(|rt| rt.block_on(healthcheck(&config))),
        _ => match init_logging(&config.log, &config.tracing) {
            Ok(logging) => {
                let served = serve(config, cli.config);
                // Spans still queued go out before the process ends.
                let Logging { lines, exporting } = logging;
                if let Some(exporting) = exporting {
                    exporting.shutdown();
                }
                // Dropping it writes out the log lines still queued.
                drop(lines);
                served
            }
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("oa-bypass: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))
}

/// Serves with `server.workers` threads, each running its own single-threaded event loop
/// with its own listener (the kernel spreads connections across them with `SO_REUSEPORT`)
/// and its own upstream connection pool, so the tasks of one request never wake another
/// thread. This thread keeps a small event loop for signals, reloads and ACME renewal.
fn serve(config: Config, explicit: Option<PathBuf>) -> Result<(), String> {
    let workers = if cfg!(unix) {
        config.server.worker_count()
    } else {
        1
    };
    let app = app_for_workers(&config, workers)
        .map_err(|err| format!("invalid configuration:\n{err}"))?;
    let control = runtime()?;
    let tls = control.block_on(async { Tls::from_config(&config.server) })?;
    let addr = SocketAddr::new(config.server.host, config.server.port);
    let cannot_listen =
        |err: std::io::Error| format!("cannot listen on {addr} (server.host, server.port): {err}");
    // SO_REUSEPORT would let a second gateway on the same port share it silently: a plain
    // bind first makes "address in use" an error, as it is for any server.
    if config.server.port != 0 {
        std::net::TcpListener::bind(addr).map_err(cannot_listen)?;
    }
    let mut settings = config.server.clone();
    settings.max_connections = settings.max_connections.and_then(|max| {
        std::num::NonZeroU32::new(max.get().div_ceil(u32::try_from(workers).unwrap_or(1)))
    });
    let mut bound = Vec::with_capacity(workers);
    let mut bind_to = addr;
    for worker in 0..workers {
        let rt = runtime()?;
        let listener = {
            let _inside = rt.enter();
            bind(bind_to, worker).map_err(cannot_listen)?
        };
        // With port 0 the first bind picks the port; the others join it.
        bind_to = listener.local_addr();
        bound.push((rt, listener.with_tls(tls.clone())));
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    for (worker, (rt, listener)) in bound.into_iter().enumerate() {
        let serving = app.serving();
        let settings = settings.clone();
        let mut stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("oa-bypass-{worker}"))
            .spawn(move || {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                rt.block_on(server::serve(listener, serving, shutdown, settings))
            })
            .map_err(|err| format!("cannot start worker thread {worker}: {err}"))?;
        threads.push(thread);
    }
    let by_tag: Vec<String> = config
        .routes
        .count_by_tag()
        .into_iter()
        .map(|(tag, count)| format!("{tag}={count}"))
        .collect();
    tracing::info!(
        addr = %bind_to,
        tls = config.server.tls.is_some() || config.server.acme.is_some(),
        workers,
        upstream = %config.upstream.base_url,
        manifest = %config.source,
        routes = config.routes.len(),
        "oa-bypass listening"
    );
    tracing::info!("endpoints by tag: {}", by_tag.join(", "));
    for mount in &config.mounts {
        tracing::info!(
            mount = %mount.upstream.mount,
            prefix = %mount.prefix,
            upstream = %mount.upstream.base_url.origin().ascii_serialization(),
            routes = mount.routes(&config.routes).len(),
            held_keys = mount.upstream.keys.len(),
            "mount"
        );
    }
    control.block_on(async {
        #[cfg(unix)]
        tokio::spawn(reload_on_sighup(Arc::clone(&app), tls, explicit));
        #[cfg(not(unix))]
        let _ = (tls, explicit);
        server::shutdown_signal().await;
    });
    let _ = stop.send(true);
    let mut failure = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = Some(format!("server failed: {err}")),
            Err(_) => failure = Some("a worker thread panicked".to_owned()),
        }
    }
    // Every request has ended: named keys' last spend goes to the state file now.
    app.flush_spend();
    if let Some(failure) = failure {
        return Err(failure);
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
fn bind(addr: SocketAddr, worker: usize) -> std::io::Result<server::Listener> {
    server::Listener::bind_shared(addr, worker)
}

#[cfg(not(unix))]
fn bind(addr: SocketAddr, _worker: usize) -> std::io::Result<server::Listener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    server::Listener::from_std(listener)
}

/// Reloads the manifest (the same file and environment as at start) on every SIGHUP, and
/// re-reads the TLS certificate files. A manifest that does not load is refused with its
/// errors logged; the running one keeps serving.
#[cfg(unix)]
async fn reload_on_sighup(app: Arc<App>, tls: Option<Arc<Tls>>, explicit: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; reload needs a restart");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received; reloading the manifest");
        // A manifest that does not parse is counted here; App::reload counts the rest.
        let loaded = Config::load(explicit.as_deref())
            .inspect_err(|_| app.count_refused_reload())
            .and_then(|config| app.reload(&config));
        if let Err(err) = loaded {
            tracing::error!(
                generation = app.generation(),
                "manifest reload refused; still serving the previous one:\n{err}"
            );
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate files re-read"),
                Err(err) => {
                    tracing::error!("TLS reload refused; the current certificate stays: {err}")
                }
            }
        }
    }
}

/// Reads one key from stdin and prints `sha256:<hex>`; the key itself is never printed.
fn hash_key() -> ExitCode {
    let mut key = String::new();
    if let Err(err) = std::io::stdin().read_line(&mut key) {
        eprintln!("oa-bypass: cannot read the key from stdin: {err}");
        return ExitCode::FAILURE;
    }
    let key = key.trim();
    if key.is_empty() {
        eprintln!(
            "oa-bypass: no key on stdin (try: printf %s \"$OPENAI_API_KEY\" | oa-bypass hash-key)"
        );
        return ExitCode::FAILURE;
    }
    println!("{}", oa_bypass::config::hash_line(key));
    ExitCode::SUCCESS
}

/// Makes a key for `name` and prints it once, with the `[keys.NAME]` block that allows it.
/// Only the block's hash is kept anywhere: the key is shown here and nowhere else.
fn new_key(name: &str) -> ExitCode {
    match oa_bypass::config::new_key_block(name) {
        Ok((key, block)) => {
            println!("{key}");
            eprintln!(
                "\nGive the key above to {name}; it is not shown again. Add this to the manifest \
                 (or set OA_BYPASS_KEYS__{}__HASH), then reload with SIGHUP:\n",
                name.to_uppercase().replace('-', "_")
            );
            print!("\n{block}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("oa-bypass: {message}");
            ExitCode::from(2)
        }
    }
}

/// `GET /health` against the configured port on loopback: exit 0 when it answers 200. Over
/// HTTPS when the gateway serves TLS; the certificate is not checked, since it names the
/// public domain, not loopback, and this only asks our own process whether it is alive.
async fn healthcheck(config: &Config) -> Result<(), String> {
    let ip = match config.server.host {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        host => host,
    };
    let addr = SocketAddr::new(ip, config.server.port);
    let tls = config.server.tls.is_some() || config.server.acme.is_some();
    let url = format!("{}://{addr}/health", if tls { "https" } else { "http" });
    let asking = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        if !tls {
            return health_status(stream).await;
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(any_certificate()?));
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        health_status(connector.connect(name, stream).await?).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), asking).await {
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("healthcheck: {url} answered {status}")),
        Ok(Err(err)) => Err(format!("healthcheck: {url} did not answer: {err}")),
        Err(_) => Err(format!("healthcheck: {url} did not answer within 3s")),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One `GET /health` over `io`.
async fn health_status<S>(io: S) -> Result<http::StatusCode, BoxError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = http::Request::get("/health")
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(request).await?.status())
}

/// TLS settings that take any certificate: for asking our own process on loopback only.
fn any_certificate() -> Result<rustls::ClientConfig, BoxError> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCertificate(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &[&str]) -> Result<Cli, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("oa-bypass").chain(list.iter().copied()))?;
        cli.checked().map(|()| cli)
    }

    #[test]
    fn the_command_line_of_earlier_releases_still_parses() {
        let cli = parse(&["--check", "--config", "x.toml"]).unwrap();
        assert!(cli.check);
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        let cli = parse(&["--config=y.toml"]).unwrap();
        assert!(!cli.check && cli.command.is_none());
        assert_eq!(cli.config, Some(PathBuf::from("y.toml")));
        let cli = parse(&["healthcheck", "--config", "z.toml"]).unwrap();
        assert_eq!(cli.command, Some(Command::Healthcheck));
        let cli = parse(&["--config", "z.toml", "healthcheck"]).unwrap();
        assert_eq!(cli.command, Some(Command::Healthcheck));
        assert_eq!(
            parse(&["hash-key"]).unwrap().command,
            Some(Command::HashKey)
        );
        assert!(parse(&["--print-openapi"]).unwrap().print_openapi);
        let cli = parse(&["keys", "new", "alice"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Keys(KeysCommand::New {
                name: "alice".into()
            }))
        );
    }

    #[test]
    fn refuses_unknown_arguments() {
        assert!(parse(&["--chek"]).is_err());
        assert!(parse(&["--config"]).is_err());
        assert!(parse(&["--check", "healthcheck"]).is_err());
        assert!(parse(&["keys"]).is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
