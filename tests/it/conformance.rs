//! The official `phoenix` npm client (pinned in tests/js/package-lock.json) against a real node:
//! every behaviour of CONTRACT §3, driven by tests/js/conformance.mjs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::*;

pub(crate) fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Installs the pinned packages once (`npm ci`), so `cargo test` alone is enough on a fresh clone.
/// Tests call it concurrently: one `npm ci` at a time.
pub(crate) fn ensure_node_modules() {
    static NPM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = NPM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = js_dir();
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.map(|o| o.status.success()).unwrap_or(false),
        "Node.js is required for the phoenix.js conformance test (install nodejs and npm)"
    );
    if ["phoenix", "ws", "playwright-core"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    }) {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .expect("npm runs");
    assert!(
        out.status.success(),
        "npm ci failed in tests/js:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[actix_web::test]
async fn the_official_phoenix_js_client_passes_the_conformance_suite() {
    actix_web::rt::task::spawn_blocking(ensure_node_modules)
        .await
        .expect("npm ci");
    let (grace, timeout, max_frame, max_joins, max_meta) = (400, 1500, 8192, 20, 2048);
    let app = spawn_app_with(|s| {
        s.presence.grace_ms = grace;
        s.presence.timeout_ms = timeout;
        s.limits.max_frame_bytes = max_frame;
        s.limits.max_joins_per_socket = max_joins;
        s.limits.max_meta_bytes = max_meta;
    })
    .await;
    let acc = app.create_account("Conformance").await;
    let envs = vec![
        (
            "PRESENCED_WS",
            format!("ws://127.0.0.1:{}/socket", app.port),
        ),
        ("PRESENCED_HTTP", app.http.clone()),
        ("PRESENCED_ACCOUNT", acc.id.clone()),
        ("PRESENCED_SECRET", acc.secret.clone()),
        ("PRESENCED_GRACE_MS", grace.to_string()),
        ("PRESENCED_TIMEOUT_MS", timeout.to_string()),
        ("PRESENCED_MAX_FRAME", max_frame.to_string()),
        ("PRESENCED_MAX_JOINS", max_joins.to_string()),
        ("PRESENCED_MAX_META", max_meta.to_string()),
        ("PRESENCED_DASHBOARD_TOKEN", app.admin_token.clone()),
    ];
    let out = actix_web::rt::task::spawn_blocking(move || {
        Command::new("node")
            .arg("conformance.mjs")
            .current_dir(js_dir())
            .envs(envs)
            .output()
            .expect("node runs")
    })
    .await
    .expect("node finished");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "phoenix.js conformance failed:\n{}\n{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("not ok"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
