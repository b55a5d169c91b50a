//! Security: tampered and misused tokens on the admin API and on the socket upgrade, hostile
//! input (oversized, malformed, mistyped, unicode, control characters, SQL metacharacters on
//! SQLite and PostgreSQL), and no secret in the logs or in an error body of a node run at debug.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::rt::time::{sleep, timeout};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use presenced::store::testdb::TempDatabase;
use presenced::store::NewUser;

use crate::helpers::*;

/// The server key of the in-process nodes here, so tests can forge tokens that differ from a
/// valid one in exactly one respect.
const SERVER_KEY: &str = "security-suite-server-key-0123456789abcdef";

async fn secured_app(db: Option<&TempDatabase>) -> TestApp {
    spawn_app_with(|s| {
        s.auth.jwt_secret = Some(SERVER_KEY.into());
        if let Some(db) = db {
            s.database.url = db.url().to_string();
        }
    })
    .await
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT with any header and claims, HMAC-SHA256-signed with `key` whatever `alg` the header
/// names (for HS/RS and HS/ES confusion: the "public key" used as an HMAC secret).
fn forge(header: &Value, claims: &Value, key: &[u8]) -> String {
    forge_with(header, claims, key, Algorithm::HS256)
}

fn forge_with(header: &Value, claims: &Value, key: &[u8], mac: Algorithm) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &EncodingKey::from_secret(key), mac)
        .expect("hmac");
    format!("{input}.{sig}")
}

/// A well-formed HS256 token.
fn hs256(claims: &Value, key: &[u8]) -> String {
    forge(&json!({"alg": "HS256", "typ": "JWT"}), claims, key)
}

/// `alg: none`, no signature.
fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// The token with one byte of its (decoded) signature flipped: still valid base64url, still
/// 32 bytes, wrong by one bit.
fn flip_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').expect("a jwt");
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).expect("base64url signature");
    bytes[7] ^= 0x01;
    format!("{input}.{}", b64(&bytes))
}

/// The claims of `token`, re-encoded after `edit`, with the original signature kept.
fn edit_claims(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
    edit(&mut claims);
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// Claims of a server access token, as the server issues them.
fn access_claims(sub: &str, role: &str, acc: Option<&str>) -> Value {
    let now = unix_s();
    let mut c = json!({
        "sub": sub, "role": role, "typ": "access", "iss": "presenced",
        "iat": now, "exp": now + 600,
    });
    if let Some(a) = acc {
        c["acc"] = Value::from(a);
    }
    c
}

fn user_claims(sub: &str, acc: &str) -> Value {
    json!({"sub": sub, "acc": acc, "exp": unix_s() + 600})
}

/// An error body is exactly `{"error": <code>, "message": <string>}`.
fn assert_error_body(v: &Value, status: u16, want_status: u16, code: &str, case: &str) {
    assert_eq!(status, want_status, "{case}: {v}");
    assert_eq!(v["error"], code, "{case}: {v}");
    assert!(v["message"].is_string(), "{case}: {v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{case}: {v}");
}

/// An HTTP/1.1 request written by hand on a fresh connection; returns the status and the JSON
/// body (`Null` when there is none, as for a 101). Lets a refused WebSocket upgrade, with
/// every handshake header a browser sends, show its JSON error, which `awc` does not expose.
async fn raw_request(port: u16, head: &str) -> (u16, Value, String) {
    let exchange = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let header_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before the response head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        if status == 101 {
            return (status, Value::Null, String::new());
        }
        let len = content_length(&head);
        while buf.len() < header_end + len {
            let n = s.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[header_end..header_end + len]).to_string();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::Null),
            body,
        )
    };
    timeout(WAIT, exchange).await.expect("the server answers")
}

/// A WebSocket upgrade as phoenix.js makes it: the token in the query (`query = true`) or as
/// the `base64url.bearer.phx.` subprotocol. Returns status, JSON body and the raw body.
async fn upgrade(port: u16, token: &str, query: bool) -> (u16, Value, String) {
    upgrade_at(port, "/socket/websocket", token, query).await
}

/// `upgrade` at another mount of the socket (`/api/v1/realtime/websocket`).
async fn upgrade_at(port: u16, path: &str, token: &str, query: bool) -> (u16, Value, String) {
    let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    let (target, proto) = if query {
        (
            format!("{path}?vsn=2.0.0&token={encoded}"),
            "phoenix".to_string(),
        )
    } else {
        (
            format!("{path}?vsn=2.0.0"),
            format!("phoenix, base64url.bearer.phx.{}", b64(token.as_bytes())),
        )
    };
    raw_request(
        port,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {proto}\r\n\r\n"
        ),
    )
    .await
}

/// Creates a dashboard user directly in the store and logs it in; returns its access token.
async fn dashboard_user(app: &TestApp, account: &str, role: &str, email: &str) -> String {
    let password = "dashboard-password-1";
    let hash = presenced::auth::hash_password(password).expect("hash");
    app.state
        .store
        .create_user(&NewUser {
            id: &presenced::store::new_id("usr_"),
            email,
            password_hash: &hash,
            role,
            account_id: Some(account),
            created_at: 0,
        })
        .expect("user created");
    login(&app.http, email, password)
        .await
        .expect("dashboard user logs in")
}

// ---- 1. token tampering ----

#[actix_web::test]
async fn tampered_and_misused_tokens_never_open_the_admin_api() {
    let app = secured_app(None).await;
    let a = app.create_account("A").await;
    let member = dashboard_user(&app, &a.id, "member", "member@a.test").await;
    let (status, pair) = app
        .send(
            "POST",
            "/api/v1/auth/login",
            None,
            &json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{pair}");
    let refresh_token = pair["refresh_token"].as_str().expect("refresh").to_string();
    // Forged with the real admin's id: access tokens of users that do not exist are refused
    // for that alone (token liveness), which would make every case below pass for the wrong
    // reason.
    let admin_id = pair["user"]["id"].as_str().expect("admin id").to_string();
    let admin_claims = access_claims(&admin_id, "admin", None);
    let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    let now = unix_s();

    // The control: the forging helpers make tokens the server accepts, so each refusal below
    // is for the one thing changed.
    let forged_ok = hs256(&admin_claims, SERVER_KEY.as_bytes());
    let (status, v) = app.get("/api/v1/accounts", &forged_ok).await;
    assert_eq!(status, 200, "the control token is refused: {v}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "flipped signature byte",
            flip_signature(&app.admin_token),
            "invalid_signature",
        ),
        (
            "empty signature",
            format!("{}.", app.admin_token.rsplit_once('.').unwrap().0),
            "invalid_signature",
        ),
        (
            "member's claims raised to admin, signature kept",
            edit_claims(&member, |c| {
                c["role"] = "admin".into();
                c.as_object_mut().unwrap().remove("acc");
            }),
            "invalid_signature",
        ),
        (
            "alg none, unsigned",
            unsigned(&admin_claims),
            "unsupported_algorithm",
        ),
        (
            "alg none, a valid signature kept",
            format!(
                "{}.{}",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                forged_ok.split_once('.').unwrap().1
            ),
            "unsupported_algorithm",
        ),
        (
            "RS256 header, HMAC with a PEM public key as secret",
            forge(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &admin_claims,
                pem.as_bytes(),
            ),
            "unsupported_algorithm",
        ),
        (
            "RS256 header, HMAC with the server key",
            forge(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &admin_claims,
                SERVER_KEY.as_bytes(),
            ),
            "unsupported_algorithm",
        ),
        (
            "ES256 header, HMAC with the server key",
            forge(
                &json!({"alg": "ES256", "typ": "JWT"}),
                &admin_claims,
                SERVER_KEY.as_bytes(),
            ),
            "unsupported_algorithm",
        ),
        (
            "HS512, correctly signed with the server key",
            forge_with(
                &json!({"alg": "HS512", "typ": "JWT"}),
                &admin_claims,
                SERVER_KEY.as_bytes(),
                Algorithm::HS512,
            ),
            "unsupported_algorithm",
        ),
        (
            "expired an hour ago",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now - 4000, "exp": now - 3600}),
                SERVER_KEY.as_bytes(),
            ),
            "token_expired",
        ),
        (
            "expired a minute ago (beyond the leeway)",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now - 600, "exp": now - 60}),
                SERVER_KEY.as_bytes(),
            ),
            "token_expired",
        ),
        (
            "nbf an hour ahead",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now, "exp": now + 7200, "nbf": now + 3600}),
                SERVER_KEY.as_bytes(),
            ),
            "token_not_yet_valid",
        ),
        (
            "signed with another server key",
            hs256(&admin_claims, b"another-server-key-0123456789abcdefghij"),
            "invalid_signature",
        ),
        (
            "typ access forged with an account's signing secret",
            hs256(&admin_claims, a.secret.as_bytes()),
            "invalid_signature",
        ),
        (
            "an end-user token signed with the account secret",
            app.user_token(&a, "ann"),
            "wrong_token_type",
        ),
        (
            "typ refresh, signed with the server key",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "refresh",
                        "iss": "presenced", "iat": now, "exp": now + 600}),
                SERVER_KEY.as_bytes(),
            ),
            "wrong_token_type",
        ),
        (
            "no typ, signed with the server key",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin",
                        "iss": "presenced", "iat": now, "exp": now + 600}),
                SERVER_KEY.as_bytes(),
            ),
            "wrong_token_type",
        ),
        (
            "another issuer, signed with the server key",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "evil", "iat": now, "exp": now + 600}),
                SERVER_KEY.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "no sub, signed with the server key",
            hs256(
                &json!({"role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now, "exp": now + 600}),
                SERVER_KEY.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "exp not a number, signed with the server key",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now, "exp": "never"}),
                SERVER_KEY.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "nbf not a number, signed with the server key",
            hs256(
                &json!({"sub": "usr_forged", "role": "admin", "typ": "access",
                        "iss": "presenced", "iat": now, "exp": now + 600, "nbf": "soon"}),
                SERVER_KEY.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "a refresh token as a bearer",
            refresh_token.clone(),
            "malformed_token",
        ),
        ("two segments", "abc.def".to_string(), "malformed_token"),
        ("four segments", format!("{forged_ok}.x"), "malformed_token"),
    ];
    for (case, token, code) in &cases {
        // A create would show in the account list if any of these got in.
        let (status, v) = app
            .send(
                "POST",
                "/api/v1/accounts",
                Some(token),
                &json!({"name": "Intruder", "plan": "pro"}).to_string(),
            )
            .await;
        assert_error_body(&v, status, 401, code, case);
        let (status, v) = app.get("/api/v1/accounts", token).await;
        assert_error_body(&v, status, 401, code, case);
    }

    // Tokens of the wrong kind at the refresh endpoint.
    for (case, token) in [
        (
            "an access token as a refresh token",
            app.admin_token.clone(),
        ),
        (
            "an end-user token as a refresh token",
            app.user_token(&a, "ann"),
        ),
    ] {
        let (status, v) = app
            .send(
                "POST",
                "/api/v1/auth/refresh",
                None,
                &json!({ "refresh_token": token }).to_string(),
            )
            .await;
        assert_error_body(&v, status, 401, "invalid_refresh_token", case);
    }

    // Nothing got in, and the server still serves a valid caller.
    let (status, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, vec!["A"], "{list}");
    let (status, v) = app
        .send(
            "POST",
            "/api/v1/auth/refresh",
            None,
            &json!({ "refresh_token": refresh_token }).to_string(),
        )
        .await;
    assert_eq!(status, 200, "the real refresh token still works: {v}");
}

#[actix_web::test]
async fn tampered_and_misused_tokens_never_open_a_socket_and_nothing_is_joined() {
    let app = secured_app(None).await;
    let a = app.create_account("A").await;
    let b = app.create_account("B").await;
    let good = app.user_token(&a, "ann");
    let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    let now = unix_s();
    let ann = user_claims("ann", &a.id);
    let (status, pair) = app
        .send(
            "POST",
            "/api/v1/auth/login",
            None,
            &json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{pair}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "flipped signature byte",
            flip_signature(&good),
            "invalid_signature",
        ),
        (
            "claims changed to another user, signature kept",
            edit_claims(&good, |c| c["sub"] = "bob".into()),
            "invalid_signature",
        ),
        (
            "alg none, unsigned",
            unsigned(&ann),
            "unsupported_algorithm",
        ),
        (
            "RS256 header, HMAC with a PEM public key as secret",
            forge(&json!({"alg": "RS256", "typ": "JWT"}), &ann, pem.as_bytes()),
            "unsupported_algorithm",
        ),
        (
            "RS256 header, HMAC with the account secret",
            forge(
                &json!({"alg": "RS256", "typ": "JWT"}),
                &ann,
                a.secret.as_bytes(),
            ),
            "unsupported_algorithm",
        ),
        (
            "ES256 header, HMAC with the account secret",
            forge(
                &json!({"alg": "ES256", "typ": "JWT"}),
                &ann,
                a.secret.as_bytes(),
            ),
            "unsupported_algorithm",
        ),
        (
            "HS384, correctly signed with the account secret",
            forge_with(
                &json!({"alg": "HS384", "typ": "JWT"}),
                &ann,
                a.secret.as_bytes(),
                Algorithm::HS384,
            ),
            "unsupported_algorithm",
        ),
        (
            "expired a minute ago (beyond the leeway)",
            hs256(
                &json!({"sub": "ann", "acc": a.id, "exp": now - 60}),
                a.secret.as_bytes(),
            ),
            "token_expired",
        ),
        (
            "nbf an hour ahead",
            hs256(
                &json!({"sub": "ann", "acc": a.id, "exp": now + 7200, "nbf": now + 3600}),
                a.secret.as_bytes(),
            ),
            "token_not_yet_valid",
        ),
        (
            "acc names account B, signed with account A's secret",
            hs256(&user_claims("ann", &b.id), a.secret.as_bytes()),
            "invalid_signature",
        ),
        (
            "typ access forged with an account's signing secret",
            hs256(
                &access_claims("usr_forged", "admin", None),
                a.secret.as_bytes(),
            ),
            "invalid_signature",
        ),
        (
            "typ refresh, signed with the account secret",
            hs256(
                &json!({"sub": "ann", "acc": a.id, "exp": now + 600, "typ": "refresh"}),
                a.secret.as_bytes(),
            ),
            "wrong_token_type",
        ),
        (
            "an access token signed with another server key",
            hs256(
                &access_claims("usr_forged", "admin", None),
                b"another-server-key-0123456789abcdefghij",
            ),
            "invalid_signature",
        ),
        (
            "an admin access token with a flipped signature",
            flip_signature(&app.admin_token),
            "invalid_signature",
        ),
        (
            "no acc claim",
            hs256(
                &json!({"sub": "ann", "exp": now + 600}),
                a.secret.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "no sub claim",
            hs256(&json!({"acc": a.id, "exp": now + 600}), a.secret.as_bytes()),
            "invalid_claims",
        ),
        (
            "nbf not a number",
            hs256(
                &json!({"sub": "ann", "acc": a.id, "exp": now + 600, "nbf": "soon"}),
                a.secret.as_bytes(),
            ),
            "invalid_claims",
        ),
        (
            "an account that does not exist",
            hs256(&user_claims("ann", "acc_nope"), a.secret.as_bytes()),
            "unknown_account",
        ),
        (
            "a refresh token",
            pair["refresh_token"].as_str().unwrap().to_string(),
            "malformed_token",
        ),
    ];
    for (case, token, code) in &cases {
        for query in [true, false] {
            let how = if query { "query" } else { "subprotocol" };
            let (status, v, _) = upgrade(app.port, token, query).await;
            assert_error_body(&v, status, 401, code, &format!("{case} ({how})"));
        }
    }

    // Nothing was connected or joined, and the node still takes a valid token.
    assert_eq!(app.metric("presenced_connections", "").await, 0.0);
    assert_eq!(app.metric("presenced_joins_total", "").await, 0.0);
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/presence", a.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        !v.to_string().contains("\"ann\""),
        "a refused token left a presence: {v}"
    );
    let (status, _, _) = upgrade(app.port, &good, false).await;
    assert_eq!(status, 101, "the real token over the subprotocol");
    // The other mount checks the same way.
    let path = "/api/v1/realtime/websocket";
    let (status, v, _) = upgrade_at(app.port, path, &flip_signature(&good), true).await;
    assert_error_body(&v, status, 401, "invalid_signature", path);
    let (status, v, _) = upgrade_at(app.port, path, &unsigned(&ann), false).await;
    assert_error_body(&v, status, 401, "unsupported_algorithm", path);
    let (status, _, _) = upgrade_at(app.port, path, &good, true).await;
    assert_eq!(status, 101, "the real token at {path}");
    let mut ok = app.connect(&good).await;
    let state = ok.join_ok("room:lobby", json!({})).await;
    assert!(state.get("ann").is_some(), "{state}");
}

// ---- 2. input validation ----

#[actix_web::test]
async fn body_errors_on_an_authenticated_route_are_distinct_json_errors() {
    let app = spawn_app().await;
    let path = "/api/v1/accounts";
    let token = Some(app.admin_token.as_str());
    let big = json!({"name": "a".repeat(70 * 1024), "plan": "pro"}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("over 64 KiB", big.clone(), 413, "payload_too_large"),
        (
            "truncated JSON",
            r#"{"name": "Acme", "#.into(),
            400,
            "malformed_json",
        ),
        ("not JSON at all", "name=Acme".into(), 400, "malformed_json"),
        ("an empty body", String::new(), 400, "malformed_json"),
        (
            "a number for the name",
            r#"{"name": 5}"#.into(),
            422,
            "invalid_fields",
        ),
        (
            "an array for the plan",
            r#"{"name": "Acme", "plan": ["pro"]}"#.into(),
            422,
            "invalid_fields",
        ),
        ("a top-level array", "[]".into(), 422, "invalid_fields"),
        (
            "an unknown field",
            r#"{"name": "Acme", "plan": "pro", "owner": "me"}"#.into(),
            422,
            "invalid_fields",
        ),
        (
            "no name",
            r#"{"plan": "pro"}"#.into(),
            422,
            "invalid_fields",
        ),
    ];
    for (case, body, want, code) in &cases {
        let (status, v) = app.send("POST", path, token, body).await;
        assert_error_body(&v, status, *want, code, case);
    }

    // Not JSON by content type, or no content type at all.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = client()
            .post(format!("{}{path}", app.http))
            .bearer_auth(&app.admin_token);
        if let Some(ct) = ct {
            req = req.insert_header(("content-type", ct));
        }
        let mut res = req
            .send_body(json!({"name": "Acme", "plan": "pro"}).to_string())
            .await
            .expect("request");
        let status = res.status().as_u16();
        let v: Value = serde_json::from_slice(&res.body().await.expect("body")).unwrap_or_default();
        assert_error_body(
            &v,
            status,
            415,
            "unsupported_media_type",
            &format!("{ct:?}"),
        );
    }

    // Too large without a Content-Length: a chunked body is cut off at the limit too.
    let chunks: Vec<Result<actix_web::web::Bytes, std::io::Error>> = big
        .into_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(actix_web::web::Bytes::copy_from_slice(c)))
        .collect();
    let mut res = client()
        .post(format!("{}{path}", app.http))
        .bearer_auth(&app.admin_token)
        .insert_header(("content-type", "application/json"))
        .send_stream(futures_util::stream::iter(chunks))
        .await
        .expect("request");
    let status = res.status().as_u16();
    let v: Value = serde_json::from_slice(&res.body().await.expect("body")).unwrap_or_default();
    assert_error_body(&v, status, 413, "payload_too_large", "chunked, over 64 KiB");

    let (status, list) = app.get(path, &app.admin_token).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["accounts"].as_array().map(Vec::len), Some(0), "{list}");
}

#[actix_web::test]
async fn control_characters_anywhere_in_an_account_name_are_a_422() {
    let app = spawn_app().await;
    for name in [
        "esc\u{1b}[31mred",
        "\u{1b}]0;title\u{7}",
        "carriage\rreturn",
        "tab\tname",
        "del\u{7f}",
        "c1 \u{85} next line",
        "csi \u{9b}31m",
        "trailing nul\u{0}",
        "\u{0}",
    ] {
        let (status, v) = app
            .send(
                "POST",
                "/api/v1/accounts",
                Some(&app.admin_token),
                &json!({"name": name, "plan": "pro"}).to_string(),
            )
            .await;
        assert_error_body(&v, status, 422, "invalid_name", &format!("{name:?}"));
    }
    let (_, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(list["accounts"].as_array().map(Vec::len), Some(0), "{list}");
}

/// Names outside ASCII are stored and returned byte for byte: no normalization, no mangling.
async fn unicode_names_round_trip_exactly(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let app = secured_app(Some(&db)).await;
    let names = [
        "Café ☕ 🚀",
        "👩\u{200d}👩\u{200d}👧\u{200d}👦 family",
        "שלום עולם",
        "مرحبا بالعالم 123",
        "abc שלום def",
        // NFD: must not come back as the precomposed "é".
        "e\u{301}cole",
        "Z\u{351}\u{34b}a\u{35b}l\u{327}g\u{321}o",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語 한국어",
        // 100 characters of 4 bytes each: the limit counts characters, not bytes.
        &"💥".repeat(100),
    ];
    let mut ids = Vec::new();
    for name in names {
        let acc = app.create_account(name).await;
        let (status, v) = app
            .get(&format!("/api/v1/accounts/{}", acc.id), &app.admin_token)
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["name"].as_str(), Some(name), "{name:?} came back as {v}");
        ids.push((acc.id, name));
    }
    let (status, v) = app
        .send(
            "POST",
            "/api/v1/accounts",
            Some(&app.admin_token),
            &json!({"name": "💥".repeat(101), "plan": "pro"}).to_string(),
        )
        .await;
    assert_error_body(&v, status, 422, "invalid_name", "101 characters");

    let (status, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200, "{list}");
    for (id, name) in &ids {
        let found = list["accounts"]
            .as_array()
            .expect("accounts")
            .iter()
            .find(|a| a["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing from {list}"));
        assert_eq!(found["name"].as_str(), Some(*name), "in the list");
        let stored = app.state.store.get_account(id).expect("stored");
        assert_eq!(stored.name.as_bytes(), name.as_bytes(), "in the database");
    }
}

#[actix_web::test]
async fn unicode_names_round_trip_exactly_on_sqlite() {
    unicode_names_round_trip_exactly(Backend::Sqlite).await;
}

#[actix_web::test]
async fn unicode_names_round_trip_exactly_on_postgres() {
    unicode_names_round_trip_exactly(Backend::Postgres).await;
}

/// SQL metacharacters in every place user input reaches a query: account names, login
/// emails and passwords, account ids, user ids and rooms in paths and queries.
async fn sql_metacharacters_are_data_not_sql(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let app = secured_app(Some(&db)).await;
    let names = [
        "Robert'); DROP TABLE accounts;--",
        "%_\\\"",
        "' OR '1'='1",
        "x'; DELETE FROM users; --",
        "\\'; TRUNCATE refresh_tokens; --",
        "$1 $$ $tag$ E'\\\\x00' ::text /* */",
    ];
    let mut created = Vec::new();
    for name in names {
        let acc = app.create_account(name).await;
        let (status, v) = app
            .get(&format!("/api/v1/accounts/{}", acc.id), &app.admin_token)
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["name"].as_str(), Some(name), "{v}");
        created.push((acc, name));
    }

    // Logins that would match every row if the email were spliced into SQL.
    for (email, password) in [
        ("' OR '1'='1", "' OR '1'='1"),
        ("' OR 1=1 --", "x"),
        (&format!("{ADMIN_EMAIL}' --") as &str, "x"),
        (&format!("{ADMIN_EMAIL}'/*") as &str, "x"),
        ("%", ADMIN_PASSWORD),
        ("%@%", ADMIN_PASSWORD),
        ("_dmin@test.local", ADMIN_PASSWORD),
        (ADMIN_EMAIL, "' OR '1'='1"),
    ] {
        let (status, v) = app
            .send(
                "POST",
                "/api/v1/auth/login",
                None,
                &json!({"email": email, "password": password}).to_string(),
            )
            .await;
        assert_error_body(&v, status, 401, "invalid_credentials", email);
    }

    // A refresh token that would match every row.
    for token in ["' OR '1'='1", "%"] {
        let (status, v) = app
            .send(
                "POST",
                "/api/v1/auth/refresh",
                None,
                &json!({ "refresh_token": token }).to_string(),
            )
            .await;
        assert_error_body(&v, status, 401, "invalid_refresh_token", token);
    }

    // Quotes in path segments and queries: refused as input, never an error from the database.
    let acc = &created[0].0;
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let quoted = "x' OR '1'='1";
    for (path, want, code) in [
        (
            format!("/api/v1/accounts/{}", enc(quoted)),
            404,
            "not_found",
        ),
        (
            format!("/api/v1/accounts/{}/presence", enc(quoted)),
            404,
            "not_found",
        ),
        (
            format!(
                "/api/v1/accounts/{}/users/{}/presence",
                acc.id,
                enc("o'brien")
            ),
            400,
            "invalid_user_id",
        ),
        (
            format!("/api/v1/accounts/{}/rooms/{}/presence", acc.id, enc(quoted)),
            400,
            "invalid_room_name",
        ),
        (
            format!(
                "/api/v1/accounts/{}/presence/history?room={}",
                acc.id,
                enc("x';--")
            ),
            400,
            "invalid_room_name",
        ),
    ] {
        let (status, v) = app.get(&path, &app.admin_token).await;
        assert_error_body(&v, status, want, code, &path);
    }

    // The account id of an end-user token reaches the database before any signature is
    // checked (to find the key): quotes there find no account.
    for acc_claim in [quoted, "acc_x' --", "%"] {
        let token = presenced::auth::mint_user_token("any", acc_claim, "ann", 600, None, None);
        let (status, v, _) = upgrade(app.port, &token, true).await;
        assert_error_body(&v, status, 401, "unknown_account", acc_claim);
    }

    // The SQL comment and LIKE characters that ids and rooms may hold are plain data.
    let user = "rob--x:1@b.c+tag";
    let room = "hall--x.~@:";
    let mut ws = app.connect(&app.user_token(acc, user)).await;
    let state = ws.join_ok(&format!("room:{room}"), json!({})).await;
    assert!(state.get(user).is_some(), "{state}");
    // The account learns the session's rooms asynchronously: ask until it has.
    let path = format!("/api/v1/accounts/{}/users/{}/presence", acc.id, enc(user));
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = app.get(&path, &app.admin_token).await;
        assert_eq!(status, 200, "{v}");
        if v["rooms"] == json!([room]) {
            assert_eq!(v["online"], true, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "where-now never shows {room}: {v}"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/rooms/{}/presence", acc.id, enc(room)),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["presences"].get(user).is_some(), "{v}");
    let (status, v) = app
        .get(
            &format!(
                "/api/v1/accounts/{}/presence/history?room={}",
                acc.id,
                enc(room)
            ),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for offline in ["a--", "x@y.z--", "%"] {
        let (status, v) = app
            .get(
                &format!(
                    "/api/v1/accounts/{}/users/{}/presence",
                    acc.id,
                    enc(offline)
                ),
                &app.admin_token,
            )
            .await;
        if offline == "%" {
            assert_error_body(&v, status, 400, "invalid_user_id", offline);
        } else {
            assert_eq!(status, 200, "{offline}: {v}");
            assert_eq!(v["online"], false, "{offline}: {v}");
        }
    }

    // Every table is still there and whole: accounts (with the exact names), users (the admin
    // logs in), refresh tokens (a refresh works), the audit log.
    let stored = app.state.store.list_accounts().expect("accounts table");
    assert_eq!(stored.len(), names.len());
    for (acc, name) in &created {
        let a = stored
            .iter()
            .find(|s| s.id == acc.id)
            .expect("account kept");
        assert_eq!(a.name, *name);
    }
    let (status, pair) = app
        .send(
            "POST",
            "/api/v1/auth/login",
            None,
            &json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "users table: {pair}");
    let (status, v) = app
        .send(
            "POST",
            "/api/v1/auth/refresh",
            None,
            &json!({"refresh_token": pair["refresh_token"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "refresh_tokens table: {v}");
    app.state
        .store
        .list_audit(None, 0, i64::MAX, 1000)
        .expect("audit table");
    let (status, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200);
    assert_eq!(list["accounts"].as_array().map(Vec::len), Some(names.len()));
    ws.close().await;
}

#[actix_web::test]
async fn sql_metacharacters_are_data_not_sql_on_sqlite() {
    sql_metacharacters_are_data_not_sql(Backend::Sqlite).await;
}

#[actix_web::test]
async fn sql_metacharacters_are_data_not_sql_on_postgres() {
    sql_metacharacters_are_data_not_sql(Backend::Postgres).await;
}

// ---- 3. no secrets in logs or error bodies ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A node as a child process logging at debug (trace for presenced) into `log`.
struct LoggedNode {
    child: Child,
    port: u16,
    http: String,
    log: PathBuf,
}

impl LoggedNode {
    fn start(dir: &Path, db_url: &str, envs: &[(&str, &str)]) -> LoggedNode {
        let port = free_port();
        let log = dir.join("node.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_presenced"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "debug,presenced=trace,presence_actors=trace")
            .env("PRESENCED__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("PRESENCED__SERVER__WORKERS", "2")
            .env("DATABASE_URL", db_url)
            .env("PRESENCED__DATABASE__POOL_SIZE", "4")
            .env("PRESENCED__SNAPSHOT__INTERVAL_MS", "200")
            .env("PRESENCED__PRESENCE__ARBITERS", "2")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        LoggedNode {
            child: cmd.spawn().expect("the presenced binary starts"),
            port,
            http: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(res) = client().get(format!("{}/readyz", self.http)).send().await {
                if res.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "the node exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the node never became ready");
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit; returns the whole log.
    async fn stop(&mut self) -> String {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM not delivered");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "the node exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "the node ignored SIGTERM");
            sleep(Duration::from_millis(50)).await;
        }
        std::fs::read_to_string(&self.log).expect("log readable")
    }
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every error body the run received, to check for leaked secrets.
#[derive(Default)]
struct Bodies(Vec<String>);

impl Bodies {
    async fn call(
        &mut self,
        http: &str,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = client().request(method.parse().expect("method"), format!("{http}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut res = match body {
            Some(b) => req.send_json(&b).await,
            None => req.send().await,
        }
        .expect("request");
        let status = res.status().as_u16();
        let raw = res.body().limit(16 << 20).await.expect("body");
        let text = String::from_utf8_lossy(&raw).to_string();
        if status >= 400 {
            self.0.push(text.clone());
        }
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_string()
}

async fn secrets_stay_out_of_logs_and_error_bodies(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_password = "Log-Test-Admin-Pw-7f3a9c21";
    let wrong_password = "Wrong-Guess-Pw-55d0e8b4";
    let jwt_secret = "log-test-server-jwt-key-0f1e2d3c4b5a69788796";
    // PostgreSQL here trusts local connections, so a password in the URL is accepted and
    // ignored by the server; it must still never be printed.
    let db_password = "Db-Pw-In-Url-91c3aa07";
    let db_url = match backend {
        Backend::Sqlite => db.url().to_string(),
        Backend::Postgres => {
            let mut u = url::Url::parse(db.url()).expect("url");
            u.set_password(Some(db_password)).expect("password");
            u.to_string()
        }
    };
    let admin_email = "ops@test.local";
    let mut node = LoggedNode::start(
        dir.path(),
        &db_url,
        &[
            ("PRESENCED__BOOTSTRAP__ADMIN_EMAIL", admin_email),
            ("PRESENCED__BOOTSTRAP__ADMIN_PASSWORD", admin_password),
            ("PRESENCED__AUTH__JWT_SECRET", jwt_secret),
        ],
    );
    node.ready().await;
    let http = node.http.clone();
    let mut bodies = Bodies::default();
    let mut secrets: Vec<(&str, String)> = vec![
        ("admin password", admin_password.into()),
        ("wrong password", wrong_password.into()),
        ("jwt secret", jwt_secret.into()),
    ];
    if matches!(backend, Backend::Postgres) {
        secrets.push(("database password", db_password.into()));
    }

    let (status, _) = bodies.call(&http, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": admin_email, "password": wrong_password})),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "nobody@test.local", "password": wrong_password})),
        )
        .await;
    assert_eq!(status, 401);
    // A client that sends a numeric PIN as a JSON number, or a secret where an object field
    // expects another type: refused, but the value is neither echoed nor logged.
    let pin: u64 = 7_319_462_805;
    secrets.push(("password sent as a number", pin.to_string()));
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": admin_email, "password": pin})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": [admin_email], "password": wrong_password})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, first) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": admin_email, "password": admin_password})),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": first["refresh_token"]})),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let access = str_of(&second, "access_token");
    for pair in [&first, &second] {
        secrets.push(("access token", str_of(pair, "access_token")));
        secrets.push(("refresh token", str_of(pair, "refresh_token")));
    }

    let (status, acc) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/accounts",
            Some(&access),
            Some(json!({"name": "Logged", "plan": "pro"})),
        )
        .await;
    assert_eq!(status, 201, "{acc}");
    let (acc_id, secret) = (str_of(&acc, "id"), str_of(&acc, "signing_secret"));
    secrets.push(("signing secret", secret.clone()));
    let user_token = presenced::auth::mint_user_token(
        &secret,
        &acc_id,
        "ann",
        3600,
        Some("Ann"),
        Some(json!({"device": "laptop"})),
    );
    secrets.push(("user token", user_token.clone()));

    let mut ws = WsClient::connect(&format!(
        "ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0&token={user_token}",
        node.port
    ))
    .await
    .expect("socket connects");
    ws.join_ok("room:lobby", json!({"status": "online"})).await;
    let r = ws.push("", "phoenix", "heartbeat", json!({})).await;
    ws.expect_reply(&r).await;
    let bad = ws.join("nowhere:x", json!({})).await;
    assert_eq!(bad["status"], "error", "{bad}");
    let (status, v) = bodies
        .call(
            &http,
            "GET",
            &format!("/api/v1/accounts/{acc_id}/presence"),
            Some(&access),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // Bad tokens: on the socket (query and subprotocol) and on the API.
    let bad_user = flip_signature(&user_token);
    let bad_access = flip_signature(&access);
    secrets.push(("tampered user token", bad_user.clone()));
    secrets.push(("tampered access token", bad_access.clone()));
    for query in [true, false] {
        let (status, _, raw) = upgrade(node.port, &bad_user, query).await;
        assert_eq!(status, 401, "{raw}");
        bodies.0.push(raw);
    }
    let (status, _, raw) = upgrade(node.port, &bad_access, true).await;
    assert_eq!(status, 401, "{raw}");
    bodies.0.push(raw);
    let (status, _) = bodies
        .call(&http, "GET", "/api/v1/accounts", Some(&bad_access), None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = bodies
        .call(&http, "GET", "/api/v1/accounts", Some(&user_token), None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/accounts",
            Some(&access),
            Some(json!({"name": format!("bad\u{1b}{secret}"), "plan": "pro"})),
        )
        .await;
    assert_eq!(status, 422);

    // Logout, then the logged-out refresh token and the spent one (a reuse) are refused.
    let (status, _) = bodies
        .call(
            &http,
            "POST",
            "/api/v1/auth/logout",
            Some(&access),
            Some(json!({"refresh_token": second["refresh_token"]})),
        )
        .await;
    assert_eq!(status, 204);
    for rt in [&second["refresh_token"], &first["refresh_token"]] {
        let (status, _) = bodies
            .call(
                &http,
                "POST",
                "/api/v1/auth/refresh",
                None,
                Some(json!({ "refresh_token": rt })),
            )
            .await;
        assert_eq!(status, 401);
    }
    let (status, _) = bodies.call(&http, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    let (status, _) = bodies.call(&http, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    ws.close().await;

    let log = node.stop().await;
    // The run was really logged, at debug, including the requests.
    assert!(log.contains("listening"), "{log}");
    assert!(log.contains("DEBUG"), "not a debug log: {log}");
    assert!(log.contains("/api/v1/auth/login"), "no request log: {log}");
    assert!(
        log.contains("/socket/websocket"),
        "no socket request log: {log}"
    );
    if matches!(backend, Backend::Postgres) {
        assert!(
            log.contains("postgres://"),
            "the database is not named: {log}"
        );
    }

    for (what, secret) in &secrets {
        let mut needles = vec![secret.clone()];
        // A JWT's signature alone is as good as the token.
        if let Some((_, sig)) = secret.rsplit_once('.') {
            if sig.len() >= 20 {
                needles.push(sig.to_string());
            }
        }
        for needle in needles {
            if let Some(line) = log.lines().find(|l| l.contains(&needle)) {
                panic!("the log holds the {what}: {line}");
            }
            for body in &bodies.0 {
                assert!(
                    !body.contains(&needle),
                    "an error body holds the {what}: {body}"
                );
            }
        }
    }
    assert_eq!(bodies.0.len(), 12, "{:?}", bodies.0);
}

#[actix_web::test]
async fn secrets_stay_out_of_logs_and_error_bodies_on_sqlite() {
    secrets_stay_out_of_logs_and_error_bodies(Backend::Sqlite).await;
}

#[actix_web::test]
async fn secrets_stay_out_of_logs_and_error_bodies_on_postgres() {
    secrets_stay_out_of_logs_and_error_bodies(Backend::Postgres).await;
}

/// Who may follow an account's live presence over the socket: an admin any account, a
/// dashboard user their own account only, an end user none (not even their own).
#[actix_web::test]
async fn only_admins_and_the_accounts_own_dashboard_users_may_follow_it() {
    let app = secured_app(None).await;
    let a = app.create_account("Follow A").await;
    let b = app.create_account("Follow B").await;
    let topic_a = format!("account:{}", a.id);
    let topic_b = format!("account:{}", b.id);

    let mut admin = app.connect(&app.admin_token).await;
    admin.join_ok(&topic_a, json!({})).await;
    admin.join_ok(&topic_b, json!({})).await;

    let viewer = dashboard_user(&app, &a.id, "viewer", "viewer@follow-a.test").await;
    let mut viewer = app.connect(&viewer).await;
    viewer.join_ok(&topic_a, json!({})).await;
    let reply = viewer.join(&topic_b, json!({})).await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");

    let mut user = app.connect(&app.user_token(&a, "ann")).await;
    for topic in [&topic_a, &topic_b] {
        let reply = user.join(topic, json!({})).await;
        assert_eq!(reply["status"], "error", "{reply}");
        assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    }
    // A refusal loses nothing: the same socket goes on working.
    user.join_ok("room:lobby", json!({})).await;
}
