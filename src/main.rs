//! `presenced`: start one node. Configuration errors stop start-up with one line naming the
//! setting; SIGTERM and Ctrl-C stop it gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use presenced::app::{self, Application};
use presenced::config::{Settings, KEYS};

fn help() -> String {
    let mut s = String::from(
        "presenced — real-time user presence engine (Phoenix Channels V2 over WebSocket)\n\n\
         USAGE: presenced [--config FILE]\n\n\
         Configuration layers: defaults < presenced.toml (or --config / PRESENCED_CONFIG) <\n\
         environment PRESENCED__SECTION__KEY (e.g. PRESENCED__SERVER__BIND=0.0.0.0:8080),\n\
         DATABASE_URL, REDIS_URL. Log level: RUST_LOG (default info).\n\nKEYS (default):\n",
    );
    for (k, d) in KEYS {
        s.push_str(&format!("  {k:<34} {d}\n"));
    }
    s
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{}", help());
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("presenced {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "-c" | "--config" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => {
                    eprintln!("presenced: --config needs a file");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("presenced: unknown argument '{other}' (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,actix_web::middleware::logger=warn"),
    )
    .init();
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("presenced: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let sys = actix_web::rt::System::new();
    sys.block_on(async move {
        let app = match Application::build(settings.clone()).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("presenced: cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        let url = format!("http://{}:{}", settings.bind_addr().map(|a| a.ip().to_string()).unwrap_or_default(), app.port());
        if let Some(pw) = &app.generated_admin_password {
            // Printed once to the terminal, never through the logger (logs are shipped and kept).
            println!(
                "\n  bootstrap admin created\n  email:    {}\n  password: {pw}\n  (shown once; set bootstrap.admin_password to choose it)\n",
                settings.bootstrap.admin_email
            );
        }
        log::info!(
            "presenced listening on {url} (socket {url}/socket/websocket, database {}); log in with POST {url}/api/v1/auth/login as {}",
            presenced::store::redact_database_url(&settings.database.url),
            settings.bootstrap.admin_email
        );
        let (handle, state) = (app.handle(), app.state());
        actix_web::rt::spawn(async move {
            wait_for_signal().await;
            app::shutdown(handle, state).await;
        });
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("presenced: server error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn wait_for_signal() {
    use actix_web::rt::signal;
    #[cfg(unix)]
    {
        let mut term = match signal::unix::signal(signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = signal::ctrl_c().await;
                return;
            }
        };
        tokio_select(signal::ctrl_c(), term.recv()).await;
    }
    #[cfg(not(unix))]
    {
        let _ = signal::ctrl_c().await;
    }
}

/// Waits for whichever of two futures finishes first.
async fn tokio_select<A: std::future::Future, B: std::future::Future>(a: A, b: B) {
    use futures_util::future::{select, Either};
    let (a, b) = (std::pin::pin!(a), std::pin::pin!(b));
    match select(a, b).await {
        Either::Left(_) | Either::Right(_) => {}
    }
}
