//! Builds and wires a node: settings → store (migrations) → keys and bootstrap admin → actor tree
//! → HTTP server. `Application::build` binds the listener (port 0 works) so tests can start real
//! nodes; `shutdown` is the one graceful-stop path, used by signals and tests alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Arbiter};
use actix_web::dev::ServerHandle;
use actix_web::{web, App};

use presence_actors::presence::IdGen;
use presence_actors::registry::{PlaceRooms, Registry, Shutdown, Stats};
use presence_actors::{now_ms, Metrics};

use crate::auth::{self, AccountKeys, KeyRing, ServerKeys};
use crate::config::Settings;
use crate::http::{self, AppState};
use crate::limits::RateLimits;
use crate::persist::{Flush, PersistConfig, Persistence};
use crate::store::{self, Account, NewUser, Store, StoreError};
use crate::usage::{FlushUsage, UsageBook, UsageMeter};

/// How long shutdown waits for sessions to close after telling them to.
const SESSION_DRAIN: Duration = Duration::from_secs(2);
/// How long shutdown waits for the final snapshot.
const SNAPSHOT_FLUSH: Duration = Duration::from_secs(5);

use actix_web::rt::time::timeout as tokio_timeout;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database.url: {0}")]
    Store(#[from] StoreError),
    #[error("server.bind: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

pub struct Application {
    serving: http::serve::Serving,
    port: u16,
    state: web::Data<AppState>,
    /// Kept so the registry's thread lives as long as the node.
    registry_arbiter: Arbiter,
    /// The cluster driver's own thread (it encodes and decodes whole node states).
    cluster_arbiter: Option<Arbiter>,
    /// Set when the bootstrap admin was created with a generated password (print it once).
    pub generated_admin_password: Option<String>,
}

/// An account's keys as the socket checks them.
pub fn account_keys(a: &Account) -> AccountKeys {
    AccountKeys {
        current: a.signing_secret.clone(),
        previous: match (&a.previous_signing_secret, a.previous_secret_expires_at) {
            (Some(s), Some(until)) => Some((s.clone(), until)),
            _ => None,
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StartError> {
    actix_web::rt::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Bootstrap(e.to_string()))?
        .map_err(StartError::from)
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        settings.validate()?;
        let settings = Arc::new(settings);
        let (url, size) = (settings.database.url.clone(), settings.database.pool_size);
        let store = blocking(move || Store::open(&url, size)).await?;

        let jwt = match &settings.auth.jwt_secret {
            Some(k) => k.clone(),
            None => {
                let s = store.clone();
                blocking(move || s.get_or_create_server_key("jwt", auth::random_secret, now_ms()))
                    .await?
            }
        };
        let keys = ServerKeys::new(&jwt, settings.auth.access_ttl_s);
        let generated_admin_password = bootstrap_admin(&store, &settings).await?;

        let keyring = KeyRing::default();
        let s = store.clone();
        for a in blocking(move || s.list_accounts()).await? {
            keyring.put(&a.id, account_keys(&a));
        }

        let prometheus = prometheus::Registry::new();
        let metrics = Metrics::new(&prometheus);
        let cluster_cfg = crate::cluster::ClusterConfig::from_settings(&settings);
        let outbox = cluster_cfg
            .as_ref()
            .map(|_| Arc::new(presence_actors::cluster::Outbox::default()));
        let engine = {
            let mut e = settings.engine();
            e.cluster.outbox = outbox.clone();
            Arc::new(e)
        };
        let ids = Arc::new(IdGen::new());
        let registry_arbiter = Arbiter::new();
        let (registry, rooms) = {
            let registry = Registry::new(engine.clone(), ids.clone(), metrics.clone());
            let rooms = registry.directory();
            let addr = Registry::start_in_arbiter(&registry_arbiter.handle(), move |_| registry);
            (addr, rooms)
        };
        // The cluster first: a node restarting within its lease restores from Redis, which is
        // fresher than the database's last snapshot.
        let cluster_arbiter = cluster_cfg.as_ref().map(|_| Arbiter::new());
        let (cluster, restored) = match (cluster_cfg, outbox, &cluster_arbiter) {
            (Some(cfg), Some(outbox), Some(arbiter)) => {
                let (c, restored) = crate::cluster::Cluster::start(
                    cfg,
                    outbox,
                    registry.clone(),
                    &prometheus,
                    &arbiter.handle(),
                )
                .await
                .map_err(|m| crate::config::ConfigError {
                    setting: "redis.url".into(),
                    message: m,
                })?;
                (Some(c), restored)
            }
            _ => (None, false),
        };
        let mut persist_cfg = PersistConfig::from_settings(&settings);
        persist_cfg.restore = !restored;
        let persistence = Persistence::start(
            persist_cfg,
            store.clone(),
            registry.clone(),
            &prometheus,
            &registry_arbiter.handle(),
        )
        .await?;
        let node = persistence.node_id.clone();

        let q = settings.plans.enterprise.clone();
        let s = store.clone();
        blocking(move || {
            s.set_plan_limits(&store::Plan {
                id: "enterprise".into(),
                max_connections: q.max_connections,
                max_rooms: q.max_rooms,
                max_messages_per_day: q.max_messages_per_day,
            })
        })
        .await?;
        let usage = UsageBook::new(store.clone(), registry.clone());
        let meter = {
            let (book, registry, store) = (usage.clone(), registry.clone(), store.clone());
            UsageMeter::start_in_arbiter(&registry_arbiter.handle(), move |_| {
                UsageMeter::new(book, registry, store)
            })
        };
        let proxies =
            crate::limits::parse_proxies(&settings.server.trusted_proxies).map_err(|m| {
                crate::config::ConfigError {
                    setting: "server.trusted_proxies".into(),
                    message: m,
                }
            })?;
        let rate = Arc::new(RateLimits::new(&settings.limits, proxies));
        {
            let rate = rate.clone();
            registry_arbiter.spawn(async move {
                loop {
                    actix_web::rt::time::sleep(Duration::from_secs(60)).await;
                    rate.sweep();
                }
            });
        }
        registry_arbiter.spawn(memory::trim_periodically(metrics.clone()));
        let state = web::Data::new(AppState {
            registry,
            rooms,
            store,
            keys,
            keyring,
            ids,
            engine,
            settings: settings.clone(),
            metrics,
            prometheus,
            node,
            persistence,
            usage,
            meter,
            rate,
            users: http::admin::UserCache::default(),
            cluster,
        });

        let addr = settings.bind_addr()?;
        let listener = http::serve::listen(addr).map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let per_core = |n: usize| match n {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            n => n,
        };
        let app_state = state.clone();
        let cors_origins = Arc::new(settings.server.cors_origins.clone());
        let make_app = move || {
            App::new()
                .app_data(app_state.clone())
                .wrap(cors(cors_origins.clone()))
                .wrap(
                    // No query string in access logs: socket tokens travel there. WebSocket
                    // upgrades are not access-logged: the logger keeps a copy of its format per
                    // request until the response ends, ~0.6 KB for each socket's whole life.
                    // Sessions log their own connect and close.
                    actix_web::middleware::Logger::new(r#"%a "%{method}xi %U" %s %b %Dms"#)
                        .custom_request_replace("method", |req| req.method().to_string())
                        .exclude("/socket/websocket")
                        .exclude("/api/v1/realtime/websocket"),
                )
                .configure(http::routes)
        };
        let serving = http::serve::serve(
            make_app,
            http::serve::ServeConfig {
                listener,
                workers: per_core(settings.server.workers),
                socket_threads: per_core(settings.server.socket_threads),
                shutdown_timeout_s: settings.server.shutdown_timeout_s,
                on_connect: tune_connection,
                workers_on_default_policy: settings.server.scheduling
                    == crate::config::Scheduling::Batch,
                on_socket_thread: {
                    let metrics = state.metrics.clone();
                    Arc::new(move |index| {
                        presence_actors::fanout::start_this_threads_lane(index, metrics.clone())
                    })
                },
            },
        )
        .map_err(|source| StartError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        if settings.presence.room_threads == crate::config::RoomThreads::Sockets {
            state.registry.do_send(PlaceRooms {
                on: serving.sockets.handles(),
            });
        }
        if let Err(e) = state
            .prometheus
            .register(Box::new(serving.sockets.collector()))
        {
            log::warn!("socket thread metrics not registered: {e}");
        }
        Ok(Application {
            serving,
            port,
            state,
            registry_arbiter,
            cluster_arbiter,
            generated_admin_password,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub fn handle(&self) -> ServerHandle {
        self.serving.server.handle()
    }

    pub fn registry(&self) -> Addr<Registry> {
        self.state.registry.clone()
    }

    /// Runs until the server is stopped (by `shutdown` or its handle).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let http::serve::Serving { server, sockets } = self.serving;
        let res = server.await;
        sockets.stop_when_drained().await;
        self.registry_arbiter.stop();
        if let Some(a) = self.cluster_arbiter {
            a.stop();
        }
        res
    }
}

/// CORS: origins from `server.cors_origins` (`"*"`: any) may call the API from a browser.
/// With none configured only the server's own origin may (the browser enforces it: no
/// `Access-Control-Allow-Origin` is sent). Requests are never refused here for their origin, so
/// WebSocket clients on customers' sites and server-to-server calls work as before.
fn cors(origins: Arc<Vec<String>>) -> actix_cors::Cors {
    let any = origins.iter().any(|o| o == "*");
    let mut c = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "PUT", "DELETE"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
        ])
        .expose_headers([actix_web::http::header::RETRY_AFTER])
        .max_age(3600)
        .block_on_origin_mismatch(false);
    if any {
        c = c.allow_any_origin().send_wildcard();
    } else {
        c = c.allowed_origin_fn(move |origin, _| {
            origin.to_str().is_ok_and(|o| {
                origins
                    .iter()
                    .any(|allowed| allowed.trim_end_matches('/') == o)
            })
        });
    }
    c
}

/// How long the kernel keeps a connection whose peer stopped acknowledging our data (including a
/// zero receive window). A client that stops reading entirely is cut by the kernel after this, so
/// a session the room already evicted as a slow consumer cannot pin its socket forever.
const STALLED_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket options for every accepted connection.
///
/// `TCP_NODELAY`: a presence frame is small and must go now. With Nagle's algorithm (the
/// kernel's default, which actix-http leaves alone) a frame written while the previous one is
/// still unacknowledged waits for that acknowledgement: a round trip, plus the client's delayed
/// ACK (40 ms and more on Linux, up to 200 ms on Windows).
/// BENCHMARKS.md has what it changed under load. Go's net package and the floor set it too.
///
/// `TCP_USER_TIMEOUT`: see [`STALLED_WRITE_TIMEOUT`].
fn tune_connection(tcp: &actix_web::rt::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        log::debug!("TCP_NODELAY not set: {e}");
    }
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_user_timeout(Some(STALLED_WRITE_TIMEOUT)) {
        log::debug!("TCP_USER_TIMEOUT not set: {e}");
    }
}

/// The graceful stop: refuse new sessions, close every socket with 1001 (clients reconnect
/// elsewhere or after the restart, within the grace window), wait briefly for them to go, then
/// stop the HTTP server.
pub async fn shutdown(handle: ServerHandle, state: web::Data<AppState>) {
    let told = state.registry.send(Shutdown).await.unwrap_or(0);
    log::info!("shutting down: closing {told} sessions");
    let start = Instant::now();
    while start.elapsed() < SESSION_DRAIN {
        match state.registry.send(Stats).await {
            Ok(s) if s.sessions > 0 => actix_web::rt::time::sleep(Duration::from_millis(20)).await,
            _ => break,
        }
    }
    // The sessions just closed are ghosts now: the last snapshot keeps them, so after a restart
    // they stay present for the grace window and their clients come back without flapping.
    match tokio_timeout(SNAPSHOT_FLUSH, state.persistence.snapshotter.send(Flush)).await {
        Ok(Ok(Ok(r))) => log::info!("final snapshot: {} sessions", r.sessions),
        Ok(Ok(Err(e))) => log::warn!("final snapshot failed: {e}"),
        _ => log::warn!("final snapshot did not finish in time"),
    }
    match tokio_timeout(SNAPSHOT_FLUSH, state.meter.send(FlushUsage)).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => log::warn!("final usage write failed: {e}"),
        _ => log::warn!("final usage write did not finish in time"),
    }
    handle.stop(true).await;
    log::info!("stopped");
}

/// Creates the first admin when there is none. Returns the password if it was generated.
async fn bootstrap_admin(store: &Store, settings: &Settings) -> Result<Option<String>, StartError> {
    let s = store.clone();
    if blocking(move || s.count_admins()).await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match &settings.bootstrap.admin_password {
        Some(p) => (p.clone(), false),
        None => (auth::random_password(), true),
    };
    let hash = actix_web::rt::task::spawn_blocking({
        let p = password.clone();
        move || auth::hash_password(&p)
    })
    .await
    .map_err(|e| StartError::Bootstrap(e.to_string()))?
    .map_err(StartError::Bootstrap)?;
    let email = settings.bootstrap.admin_email.trim().to_lowercase();
    let s = store.clone();
    blocking(move || {
        s.create_user(&NewUser {
            id: &store::new_id("usr_"),
            email: &email,
            password_hash: &hash,
            role: "admin",
            account_id: None,
            created_at: now_ms(),
        })
    })
    .await?;
    Ok(generated.then_some(password))
}

/// Scheduling of background threads.
#[allow(unsafe_code)]
pub mod os {
    /// Raises the calling thread's niceness (Linux; elsewhere nothing), so it runs on what the
    /// latency-sensitive threads leave.
    pub fn lower_this_threads_priority(niceness: i32) {
        #[cfg(target_os = "linux")]
        // SAFETY: gettid has no preconditions; setpriority on this thread's own id changes
        // only its scheduling weight.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            if libc::setpriority(libc::PRIO_PROCESS, tid, niceness) != 0 {
                log::debug!("could not lower a background thread's priority");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = niceness;
    }

    /// Puts the calling thread under `SCHED_BATCH` (Linux; elsewhere an error): same share of
    /// the CPU, but it does not preempt a running thread when it wakes. Threads and processes
    /// started from it afterwards inherit the policy.
    pub fn schedule_this_thread_as_batch() -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        return set_this_threads_policy(libc::SCHED_BATCH);
        #[cfg(not(target_os = "linux"))]
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "SCHED_BATCH is Linux only",
        ))
    }

    /// Puts the calling thread under the default policy (`SCHED_OTHER`), whatever the process
    /// runs under: for the HTTP workers (see `schedule_node`). Elsewhere than Linux, nothing.
    pub fn schedule_this_thread_as_normal() {
        #[cfg(target_os = "linux")]
        if let Err(e) = set_this_threads_policy(libc::SCHED_OTHER) {
            log::debug!("could not put a serving thread under the default policy: {e}");
        }
    }

    #[cfg(target_os = "linux")]
    fn set_this_threads_policy(policy: libc::c_int) -> std::io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 is the
        // calling thread, whose policy is all this changes.
        let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Applies `server.scheduling` to the calling thread, and so to every thread it starts
    /// afterwards: call it before the runtime starts. The HTTP workers put themselves back
    /// under the default policy when they start (`schedule_this_thread_as_normal`), so under
    /// `batch` every other thread (socket threads, arbiters, registry, snapshots, database
    /// pool) runs under `SCHED_BATCH`. A policy that cannot be applied is logged, and the node
    /// runs under the one it was started with. `normal` changes nothing: the node keeps the
    /// policy it was started with (the default, unless started under `chrt`).
    pub fn schedule_node(policy: crate::config::Scheduling) {
        use crate::config::Scheduling;
        match policy {
            Scheduling::Normal => {}
            Scheduling::Batch => match schedule_this_thread_as_batch() {
                Ok(()) => log::debug!("the node's threads run under SCHED_BATCH"),
                // Not Linux: the setting means nothing here.
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => log::debug!("{e}"),
                Err(e) => log::warn!(
                    "server.scheduling = \"batch\" not applied ({e}); the node keeps the policy it was started with"
                ),
            },
        }
    }

    /// Whether the calling thread runs under `SCHED_BATCH`.
    pub fn this_thread_is_batch() -> bool {
        #[cfg(target_os = "linux")]
        // SAFETY: reads the calling thread's policy; no pointers.
        return unsafe { libc::sched_getscheduler(0) } == libc::SCHED_BATCH;
        #[cfg(not(target_os = "linux"))]
        false
    }
}

/// glibc malloc tuning, to keep the resident memory of many idle sockets close to what they
/// use. The `presenced` binary allocates through jemalloc (`src/main.rs`), so in the node this
/// only concerns what C libraries (SQLite, libpq) allocate; it matters in full to programs that
/// embed the library with the system allocator.
#[allow(unsafe_code)]
pub mod memory {
    use std::time::Duration;

    /// One malloc arena for the whole process instead of one per thread. With a dozen threads
    /// the per-thread arenas kept each thread's connect-time garbage: ~24 KB RSS per idle
    /// session against ~12 KB with one (BENCHMARKS.md). Contention is low: the heavy paths
    /// allocate little. Call before any thread starts.
    pub fn one_arena() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }

    /// Gives free pages back to the kernel (after a connect storm, say) once a 30 s window
    /// was quiet. `malloc_trim` walks the whole heap under the allocator's lock, stalling every
    /// thread that allocates for as long: 100+ ms with 20 000 sessions, which showed as p99
    /// spikes in steady churn. A busy node reuses its free memory anyway; it is still trimmed
    /// every ten minutes.
    pub async fn trim_periodically(metrics: presence_actors::metrics::Metrics) {
        const WINDOW: Duration = Duration::from_secs(30);
        /// Presence events per second (joins, leaves, updates) below which a window is quiet.
        const QUIET_PER_S: u64 = 100;
        /// Busy windows skipped at most before a trim anyway.
        const MAX_SKIPPED: u32 = 19;
        let events = || metrics.joins.get() + metrics.leaves.get() + metrics.updates.get();
        let mut last = events();
        let mut skipped = 0;
        loop {
            actix_web::rt::time::sleep(WINDOW).await;
            let now = events();
            let busy = now.saturating_sub(last) > QUIET_PER_S * WINDOW.as_secs();
            last = now;
            if busy && skipped < MAX_SKIPPED {
                skipped += 1;
                continue;
            }
            skipped = 0;
            let started = std::time::Instant::now();
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases memory glibc holds free.
            unsafe {
                libc::malloc_trim(0);
            }
            log::debug!("malloc_trim took {:?}", started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{os, tune_connection, STALLED_WRITE_TIMEOUT};

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_put_under_sched_batch_runs_under_it_and_so_do_its_children() {
        let before = os::this_thread_is_batch();
        std::thread::spawn(|| {
            os::schedule_this_thread_as_batch().unwrap();
            assert!(os::this_thread_is_batch());
            let child = std::thread::spawn(os::this_thread_is_batch).join().unwrap();
            assert!(child, "a thread started afterwards inherits the policy");
        })
        .join()
        .unwrap();
        assert_eq!(
            os::this_thread_is_batch(),
            before,
            "only the calling thread changed"
        );
    }

    #[actix_web::test]
    async fn accepted_connections_send_at_once_and_give_up_on_a_stalled_peer() {
        let listener = actix_web::rt::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = actix_web::rt::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            !accepted.nodelay().unwrap(),
            "the kernel's default is Nagle"
        );

        tune_connection(&accepted);

        assert!(accepted.nodelay().unwrap());
        let sock = socket2::SockRef::from(&accepted);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(STALLED_WRITE_TIMEOUT)
        );
    }
}
