//! `presenced`: start one node. Configuration errors stop start-up with one line naming the
//! setting; SIGTERM and Ctrl-C stop it gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use presenced::app::{self, Application};
use presenced::config::{Settings, KEYS};

fn help() -> String {
    let mut s = String::from(
        "presenced — real-time user presence engine (Phoenix Channels V2 over WebSocket)\n\n\
         USAGE: presenced [--config FILE]\n\
         \x20      presenced demo [--password PW] [--users N] …   simulated users for the dashboard\n\
         \x20                                                   (presenced demo --help)\n\n\
         Configuration layers: defaults < presenced.toml (or --config / PRESENCED_CONFIG) <\n\
         environment PRESENCED__SECTION__KEY (e.g. PRESENCED__SERVER__BIND=0.0.0.0:8080),\n\
         DATABASE_URL, REDIS_URL. Log level: RUST_LOG (default info).\n\nKEYS (default):\n",
    );
    for (k, d) in KEYS {
        s.push_str(&format!("  {k:<34} {d}\n"));
    }
    s
}

/// jemalloc: its per-thread caches spare the node the malloc lock that glibc's single arena
/// (kept small for memory) made every thread wait on, and its decay gives a connect storm's
/// garbage back to the kernel by itself (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One arena (the thread caches take the contention), dirty pages returned within a second
/// by a background thread, so an idle node's RSS follows its live heap. `_RJEM_MALLOC_CONF`
/// in the environment overrides these.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] =
    b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:true\0";

fn main() -> ExitCode {
    presenced::app::memory::one_arena();
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("demo") {
        args.next();
        return demo(args.collect());
    }
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
    // Before the runtime starts any thread: each inherits the policy of the thread that
    // starts it.
    app::os::schedule_node(settings.server.scheduling);
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

fn demo_help() -> String {
    format!(
        "presenced demo — simulated users, so the dashboard of a running node is alive\n\n\
         USAGE: presenced demo [OPTIONS]\n\n\
         Logs in as an admin, finds or creates the account, connects the users (1–3 rooms each,\n\
         heartbeats every 30 s) and keeps them moving until Ctrl-C: status changes, room moves,\n\
         dropped and returning connections, visitors, broadcasts. One summary line every 10 s.\n\n\
         OPTIONS (default):\n\
         \x20 --url URL            the node (http://127.0.0.1:<server.bind port>, else :4000)\n\
         \x20 --password PW        the admin's password (PRESENCED_DEMO_PASSWORD, else\n\
         \x20                      bootstrap.admin_password)\n\
         \x20 --email EMAIL        the admin (bootstrap.admin_email, admin@localhost)\n\
         \x20 --account NAME       the account the users belong to (Demo; created on plan pro)\n\
         \x20 --users N            simulated users (200; at most {})\n\
         \x20 --rooms N            rooms (12)\n\
         \x20 --connect-rate N     new connections per second at most (100)\n",
        presenced::demo::MAX_USERS
    )
}

/// `presenced demo …`: runs the simulation until Ctrl-C or SIGTERM.
fn demo(args: Vec<String>) -> ExitCode {
    use presenced::demo::{self, DemoOptions};
    let mut o = DemoOptions::default();
    // Defaults from the node's own configuration when there is one (same file and environment).
    if let Ok(s) = Settings::load(None) {
        o.email = s.bootstrap.admin_email.clone();
        if let Some(pw) = &s.bootstrap.admin_password {
            o.password = pw.clone();
        }
        if let Ok(addr) = s.bind_addr() {
            let ip = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            let host = if addr.is_ipv6() && !addr.ip().is_unspecified() {
                format!("[{ip}]")
            } else {
                ip
            };
            o.url = format!("http://{host}:{}", addr.port());
        }
    }
    if let Ok(pw) = std::env::var("PRESENCED_DEMO_PASSWORD") {
        o.password = pw;
    }
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            print!("{}", demo_help());
            return ExitCode::SUCCESS;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let known = [
            "--url",
            "--password",
            "--email",
            "--account",
            "--users",
            "--rooms",
            "--connect-rate",
        ];
        if !known.contains(&flag.as_str()) {
            eprintln!("presenced demo: unknown argument '{a}' (try presenced demo --help)");
            return ExitCode::from(2);
        }
        let Some(value) = inline.or_else(|| it.next()) else {
            eprintln!("presenced demo: {flag} needs a value");
            return ExitCode::from(2);
        };
        let number = |v: &str| -> Result<usize, ExitCode> {
            v.parse::<usize>().map_err(|_| {
                eprintln!("presenced demo: {flag} needs a number, not '{v}'");
                ExitCode::from(2)
            })
        };
        match flag.as_str() {
            "--url" => o.url = value,
            "--password" => o.password = value,
            "--email" => o.email = value,
            "--account" => o.account = value,
            "--users" => match number(&value) {
                Ok(n) => o.users = n,
                Err(c) => return c,
            },
            "--rooms" => match number(&value) {
                Ok(n) => o.rooms = n,
                Err(c) => return c,
            },
            _ => match number(&value) {
                Ok(n) => o.connect_rate = u32::try_from(n).unwrap_or(u32::MAX),
                Err(c) => return c,
            },
        }
    }
    let sys = actix_web::rt::System::new();
    match sys.block_on(demo::run(o, wait_for_signal())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ demo::DemoError::Usage(_)) => {
            eprintln!("presenced demo: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("presenced demo: {e}");
            ExitCode::from(1)
        }
    }
}
