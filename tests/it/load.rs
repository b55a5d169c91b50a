//! `presenced-load` against a real node in this process: tiny runs of the connect, churn and
//! fanout scenarios, and `--procs 2` through the real binary. Counts only, never timings.

use std::time::Duration;

use serde_json::Value;

use presenced::load::{self, LoadOptions, Scenario, Summary};

use crate::helpers::*;

async fn node() -> TestApp {
    spawn_app_with(|s| {
        s.limits.connects_per_ip_per_s = 100_000;
        s.limits.joins_per_ip_per_s = 100_000;
        s.limits.joins_per_account_per_s = 100_000;
        s.limits.connects_per_account_per_s = 100_000;
    })
    .await
}

fn options(app: &TestApp, scenario: Scenario, dir: &std::path::Path) -> LoadOptions {
    LoadOptions {
        scenario,
        url: app.http.clone(),
        email: ADMIN_EMAIL.into(),
        password: ADMIN_PASSWORD.into(),
        sessions: 20,
        rooms: 4,
        rate: 200,
        changes: 20,
        duration: Duration::from_secs(2),
        // Well inside the test node's 5 s socket timeout.
        heartbeat: Duration::from_secs(1),
        progress: false,
        json: Some(dir.join("out.json")),
        report: Some(dir.join("out.html")),
        ..LoadOptions::default()
    }
}

/// The summary's counts, and the JSON and HTML it wrote.
fn check(s: &Summary, dir: &std::path::Path) {
    assert_eq!(s.sessions_connected, 20, "{}", s.table());
    assert_eq!(s.sessions_failed, 0, "{}", s.table());
    assert_eq!(s.errors_total, 0, "{:?}", s.errors);
    assert!(s.deliveries > 0, "{}", s.table());
    assert!(s.latency.count > 0, "{}", s.table());
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out.json")).unwrap()).unwrap();
    assert_eq!(json["sessions_connected"], 20);
    assert_eq!(json["scenario"], s.scenario.as_str());
    assert!(json["latency"]["p99_ms"].is_number());
    assert!(!json["timeline"].as_array().unwrap().is_empty());
    let html = std::fs::read_to_string(dir.join("out.html")).unwrap();
    assert!(html.contains("<svg"));
    assert!(!html.contains("<script"));
}

#[actix_web::test]
async fn connect_ramps_every_session_into_its_room() {
    let app = node().await;
    let dir = tempfile::tempdir().unwrap();
    let o = LoadOptions {
        // The node runs in this process: its RSS is ours.
        server_pid: Some(std::process::id()),
        ..options(&app, Scenario::Connect, dir.path())
    };
    let s = load::run(o).await.unwrap();
    check(&s, dir.path());
    assert_eq!(s.changes, 0);
    assert_eq!(s.latency_phase, "ramp");
    assert!(s.rss.is_some());
    // The node's and the generator's wait for a CPU, from the kernel's schedstat.
    if cfg!(target_os = "linux") {
        let (node, generator) = (s.server_cpu_wait_s, s.client_cpu_wait_s);
        assert!(node.is_some_and(|w| w >= 0.0), "{}", s.table());
        assert!(generator.is_some_and(|w| w >= 0.0), "{}", s.table());
        assert!(s.table().contains("waiting for a CPU"));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap())
                .unwrap();
        assert!(json["server_cpu_wait_s"].is_number());
        assert!(json["client_cpu_wait_s"].is_number());
    }
}

#[actix_web::test]
async fn churn_changes_are_seen_by_the_other_members() {
    let app = node().await;
    let dir = tempfile::tempdir().unwrap();
    let s = load::run(options(&app, Scenario::Churn, dir.path()))
        .await
        .unwrap();
    check(&s, dir.path());
    assert!(s.changes > 0);
    assert!(s.steady_deliveries > 0, "{}", s.table());
    assert_eq!(s.latency_phase, "measured");
    // The measured phase waited for the ramp's join diffs to arrive, and said so.
    assert!(s.ramp_drained && s.settle_s > 0.0, "{}", s.table());
    assert!(s.table().contains("ramp's deliveries drained"));
}

#[actix_web::test]
async fn fanout_delivers_each_change_to_the_room() {
    let app = node().await;
    let dir = tempfile::tempdir().unwrap();
    let s = load::run(options(&app, Scenario::Fanout, dir.path()))
        .await
        .unwrap();
    check(&s, dir.path());
    assert!(s.changes > 0);
    // Every status change reaches the other 19 members.
    assert!(s.steady_deliveries >= s.changes, "{}", s.table());
    // And each change's last delivery is known.
    let last = s.last_delivery.as_ref().expect("last delivery per change");
    assert!(last.count > 0 && last.count <= s.changes);
    assert!(s.receivers_per_change.unwrap() >= 1.0);
}

#[actix_web::test]
async fn two_worker_processes_share_the_sessions() {
    let app = node().await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let html = dir.path().join("out.html");
    let url = app.http.clone();
    let (json2, html2) = (json.clone(), html.clone());
    let out = actix_web::rt::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_presenced-load"))
            .args(["churn", "--url", &url, "--email", ADMIN_EMAIL])
            .args([
                "--password",
                ADMIN_PASSWORD,
                "--sessions",
                "20",
                "--rooms",
                "4",
            ])
            .args(["--rate", "200/s", "--changes", "20/s", "--duration", "2s"])
            .args([
                "--heartbeat",
                "1s",
                "--procs",
                "2",
                "--sources",
                "127.0.0.2-127.0.0.3",
            ])
            .args(["--quiet", "--json"])
            .arg(&json2)
            .arg("--report")
            .arg(&html2)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s.procs, 2);
    assert_eq!(s.sessions_connected, 20, "{stdout}");
    assert_eq!(s.errors_total, 0, "{stdout}");
    assert!(s.deliveries > 0 && s.latency.count > 0, "{stdout}");
    assert!(stdout.contains("sessions connected"));
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
    // Each worker process reports its own wait for a CPU, and the run adds them up.
    if cfg!(target_os = "linux") {
        assert!(s.client_cpu_wait_s.is_some_and(|w| w >= 0.0), "{stdout}");
        assert!(stdout.contains("waiting for a CPU"), "{stdout}");
    }
}
