//! The HTTP server: one listener, two kinds of thread.
//!
//! - **HTTP workers** (actix-server's) accept every connection and serve the API, the dashboard
//!   and the ops endpoints.
//! - **Socket threads** run the WebSocket sessions. A connection whose first request line is a
//!   socket upgrade (`GET /socket/websocket…`, `GET /api/v1/realtime/websocket…`) is handed to
//!   one of them before anything is read from it, and served there from its first byte.
//!
//! Why: a thread's wake-ups from other threads go through one FIFO. When the sessions lived on
//! the HTTP workers, a fan-out to 10 000 sessions queued ~5 000 wakes on each worker per change,
//! and a new API connection waited behind them (here-now over a new connection: p99 ~120 ms,
//! BENCHMARKS.md). Now nothing queues on an HTTP worker but HTTP.
//!
//! Both kinds of thread run the same `App`, so any request is answered the same way on either:
//! the split decides only where a connection runs. A socket upgraded on a kept-alive connection
//! that first made API calls stays on its HTTP worker (browsers and the Phoenix client open a
//! connection per socket).

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;
use actix_http::{HttpService, KeepAlive, Request};
use actix_rt::net::TcpStream;
use actix_server::{GracefulShutdownSignal, Server};
use actix_service::{
    fn_factory, fn_service, map_config, Service, ServiceFactory, ServiceFactoryExt,
};
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, ServiceRequest, ServiceResponse};
use actix_web::App;
use tokio::sync::mpsc;

/// Request lines that open a WebSocket session.
const SOCKET_REQUESTS: [&[u8]; 2] = [b"GET /socket/websocket", b"GET /api/v1/realtime/websocket"];
/// Connections one thread serves at most, of either kind (as actix-web's `HttpServer`).
const MAX_CONNECTIONS: usize = 50_000;
/// Same as actix-web's `HttpServer` defaults.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Flush (and, with the patched actix-http, release) write buffers past 4 KiB: idle sockets must
/// not keep the buffer of the largest frame they ever got.
const WRITE_BUFFER: usize = 4096;

/// Connections the kernel queues for the acceptor (capped by `net.core.somaxconn`). Std's
/// `TcpListener::bind` asks for 128, which a connect storm overflows in a few milliseconds
/// whenever the acceptor thread waits for a core; each connection dropped then retries its SYN a
/// second later.
const BACKLOG: i32 = 4096;

/// Each connection's kernel send buffer (Linux doubles it for its bookkeeping), set on the
/// listener so every accepted socket inherits it. Left to itself the kernel grows a busy
/// socket's buffer up to `tcp_wmem`'s maximum (4 MiB here): 10 000 members each sent a
/// `presence_state` of megabytes in a fanout ramp held gigabytes of kernel memory, which put the
/// machine in TCP memory pressure, where packets are dropped and senders back off for seconds.
/// A bounded buffer keeps what waits for a slow reader in the session's own bounded queue, where
/// the slow-consumer rule sees it.
const SEND_BUFFER: usize = 64 << 10;

/// Binds the listening socket, as `TcpListener::bind` does but with a long accept queue and a
/// bounded send buffer for the connections it accepts.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// What the server is built from.
pub struct ServeConfig {
    pub listener: TcpListener,
    pub workers: usize,
    pub socket_threads: usize,
    pub shutdown_timeout_s: u64,
    /// Called once per accepted connection (socket options).
    pub on_connect: fn(&TcpStream),
    /// The process runs under `SCHED_BATCH` (`server.scheduling`): each HTTP worker puts
    /// itself back under the default policy as it starts.
    pub workers_on_default_policy: bool,
    /// Called on each socket thread as it starts, with its index (the thread's fan-out lane).
    pub on_socket_thread: Arc<dyn Fn(usize) + Send + Sync>,
}

/// The running server and its socket threads.
pub struct Serving {
    pub server: Server,
    pub sockets: Arc<SocketThreads>,
}

/// The socket threads, the channels that hand them connections, and how many each serves.
pub struct SocketThreads {
    threads: Vec<SocketThread>,
    /// How long a stopping server waits for the sessions to finish closing.
    grace: Duration,
}

struct SocketThread {
    arbiter: Arbiter,
    inbox: mpsc::UnboundedSender<std::net::TcpStream>,
    live: Arc<AtomicUsize>,
}

impl SocketThreads {
    /// Connections being served on the socket threads.
    pub fn live(&self) -> usize {
        self.threads
            .iter()
            .map(|t| t.live.load(Ordering::Relaxed))
            .sum()
    }

    /// The socket threads, to start actors on.
    pub fn handles(&self) -> Vec<actix_rt::ArbiterHandle> {
        self.threads.iter().map(|t| t.arbiter.handle()).collect()
    }

    /// Once the server has stopped: waits (up to the shutdown timeout) for the sessions, told
    /// to close by then, to finish, then stops the threads.
    pub async fn stop_when_drained(&self) {
        let start = std::time::Instant::now();
        while self.live() > 0 && start.elapsed() < self.grace {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
    }

    fn stop(&self) {
        for t in &self.threads {
            t.arbiter.stop();
        }
    }

    /// Gives a connection to the socket thread serving the fewest. `Err` gives it back: every
    /// thread is at its cap, or stopping.
    fn hand(&self, io: std::net::TcpStream) -> Result<(), std::net::TcpStream> {
        // A thread whose service failed to start (logged) has dropped its inbox: skip it, or its
        // count of zero would draw every socket to it.
        let Some(t) = self
            .threads
            .iter()
            .filter(|t| !t.inbox.is_closed())
            .min_by_key(|t| t.live.load(Ordering::Relaxed))
        else {
            return Err(io);
        };
        if t.live.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            t.live.fetch_sub(1, Ordering::Relaxed);
            return Err(io);
        }
        t.inbox.send(io).map_err(|e| {
            t.live.fetch_sub(1, Ordering::Relaxed);
            e.0
        })
    }

    /// A Prometheus collector of the connections each socket thread serves, read when scraped:
    /// `presenced_socket_thread_connections{thread="0"}`…
    pub fn collector(&self) -> SocketThreadGauge {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "presenced_socket_thread_connections",
                "WebSocket connections served by each socket thread (server.socket_threads)",
            ),
            &["thread"],
        )
        .expect("valid metric");
        SocketThreadGauge {
            gauge,
            live: self.threads.iter().map(|t| t.live.clone()).collect(),
        }
    }
}

/// See `SocketThreads::collector`.
pub struct SocketThreadGauge {
    gauge: prometheus::IntGaugeVec,
    live: Vec<Arc<AtomicUsize>>,
}

impl prometheus::core::Collector for SocketThreadGauge {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        for (i, live) in self.live.iter().enumerate() {
            let n = live.load(Ordering::Relaxed).min(i64::MAX as usize) as i64;
            self.gauge.with_label_values(&[&i.to_string()]).set(n);
        }
        self.gauge.collect()
    }
}

impl Drop for SocketThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counts a connection off its socket thread when its task ends, however it ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `make_app` on `cfg.listener` with HTTP workers and socket threads as above.
pub fn serve<F, T, B>(make_app: F, cfg: ServeConfig) -> std::io::Result<Serving>
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let addr = cfg.listener.local_addr()?;
    let mut builder = Server::build()
        .workers(cfg.workers.max(1))
        .max_concurrent_connections(MAX_CONNECTIONS)
        .disable_signals()
        .shutdown_timeout(cfg.shutdown_timeout_s);
    let shutdown = builder.graceful_shutdown_signal();

    let mut threads = Vec::new();
    for index in 0..cfg.socket_threads.max(1) {
        let arbiter = Arbiter::new();
        let (inbox, rx) = mpsc::unbounded_channel();
        let live = Arc::new(AtomicUsize::new(0));
        let (make_app, shutdown, count) = (make_app.clone(), shutdown.clone(), live.clone());
        let started = cfg.on_socket_thread.clone();
        // The service is built on the thread that runs it (it is not `Send`).
        arbiter.spawn_fn(move || {
            started(index);
            let factory = http_service(make_app(), addr, shutdown);
            actix_rt::spawn(socket_thread(rx, factory, count));
        });
        threads.push(SocketThread {
            arbiter,
            inbox,
            live,
        });
    }
    let sockets = Arc::new(SocketThreads {
        threads,
        grace: Duration::from_secs(cfg.shutdown_timeout_s),
    });

    let on_connect = cfg.on_connect;
    let workers_on_default_policy = cfg.workers_on_default_policy;
    let pool = sockets.clone();
    builder = builder.listen("presenced", cfg.listener, move || {
        // Called on each worker's thread as it starts: the API answers at once, however busy
        // the sessions are (`server.scheduling`).
        if workers_on_default_policy {
            crate::app::os::schedule_this_thread_as_normal();
        }
        let http = http_service(make_app(), addr, shutdown.clone());
        let pool = pool.clone();
        fn_factory(move || {
            let fut = http.new_service(());
            let pool = pool.clone();
            async move {
                let svc = Rc::new(fut.await?);
                Ok::<_, ()>(fn_service(move |io: TcpStream| {
                    let (svc, pool) = (svc.clone(), pool.clone());
                    async move {
                        on_connect(&io);
                        match first_line(&io).await {
                            FirstLine::Http => {}
                            FirstLine::Silent => return Ok(()),
                            FirstLine::Socket => match io.into_std() {
                                Ok(std) => match pool.hand(std) {
                                    Ok(()) => return Ok(()),
                                    // Every socket thread is full, or stopping: serve it
                                    // here (while stopping, the registry refuses it).
                                    Err(std) => {
                                        let io = TcpStream::from_std(std).map_err(|_| ())?;
                                        return svc.call(io).await.map_err(|_| ());
                                    }
                                },
                                Err(e) => {
                                    log::debug!("socket hand-off failed: {e}");
                                    return Err(());
                                }
                            },
                        }
                        svc.call(io).await.map_err(|_| ())
                    }
                }))
            }
        })
    })?;
    Ok(Serving {
        server: builder.run(),
        sockets,
    })
}

/// One socket thread: builds its own HTTP service (the `App` is per thread) and serves every
/// connection it is handed on this thread.
async fn socket_thread<S>(
    mut inbox: mpsc::UnboundedReceiver<std::net::TcpStream>,
    factory: S,
    live: Arc<AtomicUsize>,
) where
    S: ServiceFactory<TcpStream, Config = (), Response = (), InitError = ()>,
    S::Service: 'static,
{
    let svc = match factory.new_service(()).await {
        Ok(s) => Rc::new(s),
        Err(()) => {
            log::error!("socket thread: the HTTP service failed to start");
            return;
        }
    };
    while let Some(std) = inbox.recv().await {
        let counted = Live(live.clone());
        match TcpStream::from_std(std) {
            Ok(io) => {
                let svc = svc.clone();
                actix_rt::spawn(async move {
                    let _ = svc.call(io).await;
                    drop(counted);
                });
            }
            Err(e) => log::warn!("socket thread: cannot take a connection: {e}"),
        }
    }
}

/// Where a new connection is served, from its first request line. Reads nothing: the bytes
/// are only peeked at, and whoever serves the connection reads them.
async fn first_line(io: &TcpStream) -> FirstLine {
    let longest = SOCKET_REQUESTS.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut buf = [0u8; 32];
    // The first bytes: awaited without polling, as long as a client may take to send a request.
    let mut n =
        match actix_rt::time::timeout(CLIENT_REQUEST_TIMEOUT, io.peek(&mut buf[..longest])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return FirstLine::Http,
            Ok(Ok(n)) => n,
            Err(_) => return FirstLine::Silent,
        };
    // When only part of the line has come, look again after growing pauses (peeking at bytes
    // already seen returns at once, so it cannot be awaited), ~0.13 s in all; then serve it
    // where it is (both kinds of thread answer every request the same way).
    let mut pauses = [1, 2, 4, 8, 16, 32, 64].into_iter();
    loop {
        match first_line_kind(&buf[..n]) {
            Some(true) => return FirstLine::Socket,
            Some(false) => return FirstLine::Http,
            None => {}
        }
        let Some(pause) = pauses.next() else {
            return FirstLine::Http;
        };
        actix_rt::time::sleep(Duration::from_millis(pause)).await;
        n = match io.peek(&mut buf[..longest]).await {
            Ok(0) | Err(_) => return FirstLine::Http,
            Ok(n) => n,
        };
    }
}

enum FirstLine {
    Socket,
    Http,
    /// Nothing sent within the request timeout: closed, as the HTTP service would.
    Silent,
}

/// `Some(true)`: a socket upgrade; `Some(false)`: anything else; `None`: too few bytes to tell.
fn first_line_kind(seen: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for p in SOCKET_REQUESTS {
        if seen.len() >= p.len() {
            if seen.starts_with(p) {
                return Some(true);
            }
        } else if p.starts_with(seen) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// The HTTP/1 service of one thread, with actix-web's `HttpServer` settings.
fn http_service<T, B>(
    app: App<T>,
    addr: SocketAddr,
    shutdown: GracefulShutdownSignal,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), InitError = ()>
where
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    // What `HttpServer` passes (`AppConfig::new` is crate-private in actix-web 4.18; this is its
    // public twin).
    let app_config = AppConfig::__priv_test_new(false, addr.to_string(), addr);
    let app = actix_service::IntoServiceFactory::<_, Request>::into_factory(app)
        .map_err(|e: actix_web::Error| e.error_response());
    HttpService::build()
        .graceful_shutdown_signal(move || {
            let s = shutdown.clone();
            async move { s.notified().await }
        })
        .keep_alive(KeepAlive::default())
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        .h1_allow_half_closed(true)
        .h1_write_buffer_size(WRITE_BUFFER)
        .local_addr(addr)
        .finish(map_config(app, move |_| app_config.clone()))
        .tcp()
}

#[cfg(test)]
mod tests {
    use super::{first_line_kind, listen};

    /// The kernel completes handshakes into the accept queue by itself, so a listener nobody
    /// accepts on shows how many it queues: with std's 128 the next SYN is dropped and its
    /// connect waits for a retransmission (one second, then three).
    #[test]
    fn the_listener_queues_a_connect_storm_instead_of_dropping_it() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..400 {
            let c = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connection {i} not queued: {e}"));
            held.push(c);
        }
    }

    #[test]
    fn accepted_connections_have_the_bounded_send_buffer() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let size = socket2::SockRef::from(&accepted)
            .send_buffer_size()
            .unwrap();
        // Linux reports twice what was asked (its bookkeeping); the kernel's default is 16 KiB.
        assert!(
            (super::SEND_BUFFER..=2 * super::SEND_BUFFER).contains(&size),
            "{size}"
        );
    }

    #[test]
    fn the_first_request_line_tells_sockets_from_http() {
        assert_eq!(
            first_line_kind(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1"),
            Some(true)
        );
        assert_eq!(
            first_line_kind(b"GET /api/v1/realtime/websocket?token=x"),
            Some(true)
        );
        assert_eq!(
            first_line_kind(b"GET /api/v1/accounts HTTP/1.1"),
            Some(false)
        );
        assert_eq!(first_line_kind(b"POST /socket/websocket"), Some(false));
        assert_eq!(first_line_kind(b"GET /healthz"), Some(false));
        // Too little to tell yet.
        assert_eq!(first_line_kind(b"GE"), None);
        assert_eq!(first_line_kind(b"GET /"), None);
        assert_eq!(first_line_kind(b"GET /api/v1/rea"), None);
        assert_eq!(first_line_kind(b""), None);
    }
}
