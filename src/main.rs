//! The `pushgate` binary: parse arguments, load config, set up logs, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc, for the memory an idle connection holds: see Cargo.toml.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for bad usage or a bad config (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit status when the server could not run (e.g. the port is taken).
const EXIT_FAILURE: u8 = 1;

/// pushgate: real-time push (WebSocket, SSE, long-poll) for an existing web app.
#[derive(Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Run with this YAML config (see config.example.yaml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 when good, else list every problem and exit 64.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a self-contained demo: pushgate in front of a built-in chat app,
    /// on 127.0.0.1, with a page to open in a browser.
    Demo {
        /// Where the page is served (pushgate's public listener; loopback only).
        #[arg(long, value_name = "ADDR", default_value = pushgate::demo::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// pushgate's publish API (loopback only).
        #[arg(long, value_name = "ADDR", default_value = pushgate::demo::DEFAULT_API_LISTEN)]
        api_listen: SocketAddr,
        /// Use the Redis engine at this URL (e.g. redis://127.0.0.1:6379)
        /// instead of the memory engine.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// The API key the demo prints (at least 32 characters); without
        /// it, a new one at each start, so a copied command stops working.
        #[arg(long, value_name = "KEY", env = "PUSHGATE_DEMO_API_KEY")]
        api_key: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The connection limit defaults from the open-file limit, so raise it
    // before the config is validated against it.
    pushgate::files::raise_open_file_limit();

    match (cli.command, cli.config) {
        (Some(Command::CheckConfig { file }), _) => match load(&file) {
            Ok(_) => {
                println!("{}: configuration is valid", file.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        (
            Some(Command::Demo {
                listen,
                api_listen,
                redis,
                api_key,
            }),
            _,
        ) => demo(pushgate::demo::DemoOptions {
            listen,
            api_listen,
            redis,
            api_key,
        }),
        (None, Some(file)) => {
            let settings = match load(&file) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            pushgate::logging::init(&settings);
            serve(settings, file)
        }
        (None, None) => {
            eprintln!(
                "pushgate: nothing to do\n\ntry:   pushgate demo\nrun:   pushgate --config FILE\ncheck: pushgate check-config FILE\n\nsee pushgate --help"
            );
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn load(file: &std::path::Path) -> Result<pushgate::Settings, ExitCode> {
    pushgate::config::load(file, std::env::vars()).map_err(|err| {
        eprint!("pushgate: {err}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn demo(options: pushgate::demo::DemoOptions) -> ExitCode {
    if let Some(problem) = options.problem() {
        eprintln!("pushgate demo: {problem}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let config = options.config(SocketAddr::from(([127, 0, 0, 1], 0)), "unused");
    match pushgate::Settings::new(config) {
        Ok(settings) => pushgate::logging::init(&settings),
        Err(err) => {
            eprint!("pushgate demo: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    let result = runtime.block_on(pushgate::demo::run(
        options,
        pushgate::shutdown::signal(),
        |running| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(running.banner().as_bytes());
            let _ = out.flush();
        },
    ));
    runtime.shutdown_background();
    match result {
        Ok(()) => {
            // Whoever started the demo in a terminal sees it end, as they
            // saw it start.
            println!("pushgate demo stopped: connections closed, state (memory engine) gone.");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("pushgate demo: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The main thread's runtime (current-thread; the public listener's other
/// shards start their own), or the exit code when it cannot start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("pushgate: cannot start the runtime: {err}");
            ExitCode::from(EXIT_FAILURE)
        })
}

fn serve(settings: pushgate::Settings, file: PathBuf) -> ExitCode {
    // One single-threaded runtime per core, each accepting on its own socket
    // (see Server::bind_sharded): measured faster than one work-stealing
    // runtime for proxying, since a request never changes threads.
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        let server = pushgate::Server::bind_sharded(settings, shards).await?;
        // SIGHUP reads the same file again (docs/operations.md).
        tokio::spawn(pushgate::reload::on_hangup(file, server.reloader()));
        server.run(pushgate::shutdown::signal()).await
    });
    // Tunnels still open after the grace period are dropped here.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(pushgate::Error::Config(err)) => {
            eprint!("pushgate: {err}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(err) => {
            tracing::error!(error = %err, "pushgate stopped");
            eprintln!("pushgate: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
