//! The live dashboard end to end, in headless Chromium: `tests/js/dashboard.mjs <scenario> <base
//! url>` drives the page with playwright-core and opens the end users' sockets itself with the
//! official phoenix client; this side starts the node (in-process, or as a child process when a
//! scenario stops and restarts it), prepares accounts and dashboard users, and answers the
//! script's control requests (`@@ctrl stop` / `@@ctrl start` on its stdout, `ok` on its stdin).
//!
//! Chromium is `/usr/bin/chromium` (or `PRESENCED_CHROMIUM`). Under `CI=true` a missing browser
//! fails the tests; elsewhere they print a skip line and pass. Screenshots go to
//! `target/screenshots/` of the repository.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::conformance::{ensure_node_modules, js_dir};
use crate::helpers::*;

const PASSWORD: &str = "password-123";

/// The browser, or `None` (skip) when it is missing outside CI.
fn chromium() -> Option<String> {
    let path = std::env::var("PRESENCED_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if Path::new(&path).exists() {
        return Some(path);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "Chromium is required for the dashboard tests under CI and {path} is missing \
         (apt-get install -y chromium chromium-driver)"
    );
    eprintln!(
        "SKIPPED dashboard browser test: {path} not found \
         (apt-get install -y chromium chromium-driver, or set PRESENCED_CHROMIUM)"
    );
    None
}

/// One browser at a time: two cores, and each scenario's waits should not compete with
/// another Chromium. (An async lock: each test runs on its own runtime, and a failed scenario
/// must not stop the others.)
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// Everything a scenario needs, checked before any node starts: `None` = skipped.
async fn prepare() -> Option<(tokio::sync::MutexGuard<'static, ()>, String)> {
    let chromium = chromium()?;
    let guard = BROWSER.lock().await;
    actix_web::rt::task::spawn_blocking(ensure_node_modules)
        .await
        .expect("npm ci");
    Some((guard, chromium))
}

/// Settings of the in-process nodes: the page keeps phoenix.js's default 30 s heartbeat, so the
/// idle timeout is the production default; a short grace so leaves of dropped sockets show soon.
fn dashboard_settings(s: &mut presenced::config::Settings) {
    s.presence.timeout_ms = 60_000;
    s.presence.grace_ms = 1_000;
}

async fn create_user(app: &TestApp, email: &str, role: &str, account: &str) {
    let (s, v) = app
        .send(
            "POST",
            "/api/v1/users",
            Some(&app.admin_token),
            &json!({"email": email, "password": PASSWORD, "role": role, "account_id": account})
                .to_string(),
        )
        .await;
    assert_eq!(s, 201, "create {role} {email}: {v}");
}

/// Runs the scenario script to its end; `on_ctrl` performs what it asks for. Panics with the
/// failed checks unless every check passed.
fn run_scenario(
    scenario: &str,
    base: &str,
    chromium: &str,
    envs: Vec<(&'static str, String)>,
    mut on_ctrl: impl FnMut(&str),
) {
    let mut child = Command::new("node")
        .arg("dashboard.mjs")
        .arg(scenario)
        .arg(base)
        .current_dir(js_dir())
        .env("DASH_ADMIN_EMAIL", ADMIN_EMAIL)
        .env("DASH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("DASH_PASSWORD", PASSWORD)
        .env("DASH_CHROMIUM", chromium)
        .env("DASH_SCREENSHOTS", screenshots_dir())
        .envs(envs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (Node.js >= 20 is required)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("stdout line");
        println!("{line}");
        if let Some(what) = line.strip_prefix("@@ctrl ") {
            on_ctrl(what.trim());
            let _ = writeln!(stdin, "ok");
            let _ = stdin.flush();
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().expect("node exits");
    let stderr = stderr.join().unwrap_or_default();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("not ok")).collect();
    assert!(
        status.success() && failed.is_empty() && out.contains(" passed, 0 failed"),
        "dashboard scenario {scenario} failed ({status}):\n{}\n--- stderr:\n{}",
        failed.join("\n"),
        stderr
            .chars()
            .rev()
            .take(4000)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
}

/// Runs a scenario against a node that lives in this process (no control requests).
async fn run_in_process(
    scenario: &'static str,
    app: &TestApp,
    chromium: String,
    envs: Vec<(&'static str, String)>,
) {
    let base = app.http.clone();
    actix_web::rt::task::spawn_blocking(move || {
        run_scenario(scenario, &base, &chromium, envs, |what| {
            panic!("scenario {scenario} asked for {what}, which needs a child-process node")
        })
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
}

/// (a) An admin picks the account and watches a user join, change status and leave; filters,
/// counters, rooms and the feed follow.
#[actix_web::test]
async fn dashboard_shows_joins_status_changes_and_leaves_live() {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let app = spawn_app_with(dashboard_settings).await;
    let acc = app.create_account("Acme Live").await;
    let _other = app.create_account("Another Co").await;
    let envs = vec![
        ("DASH_ACCOUNT", acc.id.clone()),
        ("DASH_SECRET", acc.secret.clone()),
    ];
    run_in_process("live", &app, chromium, envs).await;
}

/// (b) Markup in user names, metas and the account name is shown as text; nothing runs, and the
/// page is served with a strict CSP.
#[actix_web::test]
async fn dashboard_renders_hostile_strings_as_text() {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let app = spawn_app_with(dashboard_settings).await;
    let acc = app
        .create_account("<img src=x onerror=alert('acc')>\"><script>alert('acc')</script>")
        .await;
    let envs = vec![
        ("DASH_ACCOUNT", acc.id.clone()),
        ("DASH_SECRET", acc.secret.clone()),
    ];
    run_in_process("xss", &app, chromium, envs).await;
}

/// (c) Phone and desktop: no horizontal overflow on the login, main and room screens;
/// screenshots of each.
#[actix_web::test]
async fn dashboard_fits_phone_and_desktop_screens() {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let app = spawn_app_with(dashboard_settings).await;
    let acc = app.create_account("Acme Corp").await;
    let envs = vec![
        ("DASH_ACCOUNT", acc.id.clone()),
        ("DASH_SECRET", acc.secret.clone()),
    ];
    run_in_process("responsive", &app, chromium, envs).await;
}

/// (f) A member and a viewer see their own account only, with no account picker and no owner
/// actions; a wrong password is refused on the login form.
#[actix_web::test]
async fn members_and_viewers_see_their_own_account_without_owner_actions() {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let app = spawn_app_with(dashboard_settings).await;
    let acc = app.create_account("Acme Members").await;
    let other = app.create_account("Other Tenant").await;
    create_user(&app, "member@acme.test", "member", &acc.id).await;
    create_user(&app, "viewer@acme.test", "viewer", &acc.id).await;
    let envs = vec![
        ("DASH_ACCOUNT", acc.id.clone()),
        ("DASH_SECRET", acc.secret.clone()),
        ("DASH_OTHER_ACCOUNT", other.id.clone()),
        ("DASH_OTHER_SECRET", other.secret.clone()),
        ("DASH_MEMBER_EMAIL", "member@acme.test".into()),
        ("DASH_VIEWER_EMAIL", "viewer@acme.test".into()),
    ];
    run_in_process("roles", &app, chromium, envs).await;
}

/// Owner actions: usage is shown, a session is kicked from the user's detail, the signing secret
/// is rotated through a confirm step and the new secret signs working tokens.
#[actix_web::test]
async fn owners_kick_sessions_and_rotate_the_secret() {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let app = spawn_app_with(dashboard_settings).await;
    let acc = app.create_account("Acme Owners").await;
    create_user(&app, "owner@acme.test", "owner", &acc.id).await;
    let envs = vec![
        ("DASH_ACCOUNT", acc.id.clone()),
        ("DASH_SECRET", acc.secret.clone()),
        ("DASH_OWNER_EMAIL", "owner@acme.test".into()),
    ];
    run_in_process("owner", &app, chromium, envs).await;
}

// ------------------------------------------------------------------------------------------------
// Scenarios that stop and restart the node: a child process on a fixed port and SQLite file.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct ChildNode {
    child: Option<Child>,
    port: u16,
    db_url: String,
    access_ttl_s: u64,
}

impl ChildNode {
    fn start(port: u16, db_url: &str, access_ttl_s: u64) -> ChildNode {
        let mut node = ChildNode {
            child: None,
            port,
            db_url: db_url.into(),
            access_ttl_s,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_presenced"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env(
                "PRESENCED__SERVER__BIND",
                format!("127.0.0.1:{}", self.port),
            )
            .env("PRESENCED__SERVER__WORKERS", "2")
            .env("DATABASE_URL", &self.db_url)
            .env("PRESENCED__DATABASE__POOL_SIZE", "4")
            .env("PRESENCED__BOOTSTRAP__ADMIN_EMAIL", ADMIN_EMAIL)
            .env("PRESENCED__BOOTSTRAP__ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("PRESENCED__PRESENCE__GRACE_MS", "1000")
            .env("PRESENCED__PRESENCE__ARBITERS", "2")
            .env("PRESENCED__SNAPSHOT__INTERVAL_MS", "200")
            .env(
                "PRESENCED__AUTH__ACCESS_TTL_S",
                self.access_ttl_s.to_string(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the presenced binary starts");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `GET /readyz` until it answers 200 (blocking: runs beside the script).
    fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let ok = TcpStream::connect(("127.0.0.1", self.port))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)?;
                    Ok(head.ends_with(b"200"))
                })
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the node did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL: a crash, not a shutdown; clients see their sockets drop.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ctrl(&mut self, what: &str) {
        match what {
            "stop" => self.stop(),
            "start" => self.spawn(),
            other => panic!("unknown control request {other}"),
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child node with one account; runs `scenario` against it with stop/start control.
async fn run_with_child_node(scenario: &'static str, access_ttl_s: u64) {
    let Some((_browser, chromium)) = prepare().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("dash.db").display());
    let port = free_port();
    let node =
        actix_web::rt::task::spawn_blocking(move || ChildNode::start(port, &db_url, access_ttl_s))
            .await
            .expect("node starts");
    let http = format!("http://127.0.0.1:{port}");
    let admin = login(&http, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .expect("admin logs in");
    let mut res = client()
        .post(format!("{http}/api/v1/accounts"))
        .bearer_auth(&admin)
        .send_json(&json!({"name": "Acme Restarts", "plan": "pro"}))
        .await
        .expect("create account");
    assert_eq!(res.status().as_u16(), 201);
    let acc: serde_json::Value = res.json().await.expect("account json");
    let envs = vec![
        ("DASH_ACCOUNT", acc["id"].as_str().expect("id").to_string()),
        (
            "DASH_SECRET",
            acc["signing_secret"].as_str().expect("secret").to_string(),
        ),
        ("DASH_ACCESS_TTL_S", access_ttl_s.to_string()),
    ];
    actix_web::rt::task::spawn_blocking(move || {
        let mut node = node;
        run_scenario(scenario, &http, &chromium, envs, |what| node.ctrl(what));
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    drop(dir);
}

/// (d) The node goes away and comes back on the same port: the page says `reconnecting`, then
/// `live`, and the online list is right again (the user who came back is there, the one who
/// did not is gone, a new join shows).
#[actix_web::test]
async fn dashboard_reconnects_after_the_node_restarts() {
    run_with_child_node("reconnect", 900).await;
}

/// (e) Access tokens live 2 s: long after that, presence changes still show, API calls still
/// succeed, a reload resumes the session, and the socket comes back after a restart with a
/// fresh token.
#[actix_web::test]
async fn dashboard_keeps_working_after_its_access_token_expires() {
    run_with_child_node("expiry", 2).await;
}
