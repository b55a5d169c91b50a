//! Credentials: argon2 password hashes, the server's own access tokens (HS256, server key), and
//! the end-user tokens customers mint with their account's signing secret (HS256, `sub`, `acc`,
//! `exp`, optional `name` and `meta`). Only HS256 is accepted: `alg: none` and RS/HS confusion
//! are refused before any key is chosen.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use base64::Engine;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use presence_actors::now_ms;

/// Seconds of clock skew tolerated on `exp`/`nbf`.
const LEEWAY_S: u64 = 5;

pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A random secret: 32 bytes, base64url.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A human-typable random password.
pub fn random_password() -> String {
    let bytes: [u8; 15] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Claims of the server's access tokens (dashboard users and admins).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc: Option<String>,
    /// Always `"access"`: an access token is never a refresh token or a user token.
    pub typ: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

pub const ISSUER: &str = "presenced";

/// Claims of end-user tokens minted by a customer's backend.
#[derive(Debug, Clone, Deserialize)]
pub struct UserClaims {
    pub sub: String,
    pub acc: String,
    pub exp: u64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub meta: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm")]
    Algorithm,
    #[error("invalid signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("unknown account")]
    UnknownAccount,
    #[error("wrong token type")]
    WrongType,
    #[error("invalid claims")]
    Claims,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::Malformed => "malformed_token",
            TokenError::Algorithm => "unsupported_algorithm",
            TokenError::Signature => "invalid_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::UnknownAccount => "unknown_account",
            TokenError::WrongType => "wrong_token_type",
            TokenError::Claims => "invalid_claims",
        }
    }
}

fn map_jwt(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidSignature => TokenError::Signature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName => TokenError::Algorithm,
        K::MissingRequiredClaim(_)
        | K::InvalidClaimFormat(_)
        | K::Json(_)
        | K::InvalidIssuer
        | K::InvalidAudience
        | K::InvalidSubject => TokenError::Claims,
        _ => TokenError::Malformed,
    }
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = LEEWAY_S;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

/// What the middle of a JWT says, read before verification only to choose the key.
#[derive(Deserialize, Default)]
struct Peek {
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    acc: Option<String>,
}

/// The JSON of one base64url segment of a JWT.
fn segment<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

fn peek(token: &str) -> Result<Peek, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(body), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    // `alg` is read as a plain string first: jsonwebtoken's `Algorithm` has no `none`, so
    // `decode_header` would call an unsigned token merely malformed, hiding the attack.
    let raw: Map<String, Value> = segment(header)?;
    match raw.get("alg").and_then(Value::as_str) {
        Some("HS256") => {}
        Some(_) => return Err(TokenError::Algorithm),
        None => return Err(TokenError::Malformed),
    }
    jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    segment(body)
}

/// Issues and checks the server's own access tokens.
#[derive(Clone)]
pub struct ServerKeys {
    enc: EncodingKey,
    dec: DecodingKey,
    access_ttl_s: u64,
}

impl ServerKeys {
    pub fn new(secret: &str, access_ttl_s: u64) -> ServerKeys {
        ServerKeys {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            access_ttl_s,
        }
    }

    pub fn access_ttl_s(&self) -> u64 {
        self.access_ttl_s
    }

    pub fn issue_access(&self, user_id: &str, role: &str, acc: Option<&str>) -> String {
        let now = (now_ms() / 1000) as u64;
        let claims = AccessClaims {
            sub: user_id.into(),
            role: role.into(),
            acc: acc.map(String::from),
            typ: "access".into(),
            iss: ISSUER.into(),
            iat: now,
            exp: now + self.access_ttl_s,
        };
        // HS256 with an in-memory key cannot fail to encode.
        encode(&Header::new(Algorithm::HS256), &claims, &self.enc).unwrap_or_default()
    }

    pub fn verify_access(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let p = peek(token)?;
        if p.typ.as_deref() != Some("access") {
            return Err(TokenError::WrongType);
        }
        let mut v = validation();
        v.set_issuer(&[ISSUER]);
        let data = decode::<AccessClaims>(token, &self.dec, &v).map_err(map_jwt)?;
        Ok(data.claims)
    }
}

/// An account's signing keys as the socket needs them: the current secret and, during a
/// rotation's grace, the previous one.
#[derive(Clone)]
pub struct AccountKeys {
    pub current: String,
    pub previous: Option<(String, i64)>,
}

/// The signing keys of every account, cached in memory so a socket upgrade costs no database
/// round trip. Filled at start and on create/rotate; a miss falls back to the database.
#[derive(Clone, Default)]
pub struct KeyRing {
    inner: Arc<RwLock<HashMap<String, (AccountKeys, std::time::Instant)>>>,
}

impl KeyRing {
    pub fn put(&self, account: &str, keys: AccountKeys) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(account.into(), (keys, std::time::Instant::now()));
        }
    }

    pub fn get(&self, account: &str) -> Option<AccountKeys> {
        self.inner.read().ok()?.get(account).map(|(k, _)| k.clone())
    }

    /// How long ago the account's keys were loaded (another node may have rotated since).
    pub fn age(&self, account: &str) -> Option<std::time::Duration> {
        Some(self.inner.read().ok()?.get(account)?.1.elapsed())
    }
}

/// The socket's view of who connects.
#[derive(Debug, Clone)]
pub enum Principal {
    /// An end user of an account (a customer's token).
    User(UserClaims),
    /// A dashboard user or admin (a server access token).
    Staff(AccessClaims),
}

/// Which key a token needs: the server's, or an account's (by id).
pub enum KeyNeed {
    Server,
    Account(String),
}

pub fn key_need(token: &str) -> Result<KeyNeed, TokenError> {
    let p = peek(token)?;
    match p.typ.as_deref() {
        Some("access") => Ok(KeyNeed::Server),
        Some(_) => Err(TokenError::WrongType),
        None => p.acc.map(KeyNeed::Account).ok_or(TokenError::Claims),
    }
}

/// Verifies an end-user token with the account's keys (the previous secret only while its
/// rotation grace lasts).
pub fn verify_user(token: &str, keys: &AccountKeys) -> Result<UserClaims, TokenError> {
    let v = validation();
    let first = decode::<UserClaims>(
        token,
        &DecodingKey::from_secret(keys.current.as_bytes()),
        &v,
    );
    let claims = match first {
        Ok(d) => d.claims,
        Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
            match &keys.previous {
                Some((prev, until)) if now_ms() < *until => {
                    decode::<UserClaims>(token, &DecodingKey::from_secret(prev.as_bytes()), &v)
                        .map_err(map_jwt)?
                        .claims
                }
                _ => return Err(TokenError::Signature),
            }
        }
        Err(e) => return Err(map_jwt(e)),
    };
    Ok(claims)
}

/// Mints an end-user token, as a customer's backend would (used by tests and the demo).
pub fn mint_user_token(
    secret: &str,
    account: &str,
    user: &str,
    ttl_s: u64,
    name: Option<&str>,
    meta: Option<Value>,
) -> String {
    let mut claims = serde_json::json!({
        "sub": user,
        "acc": account,
        "exp": (now_ms() / 1000) as u64 + ttl_s,
    });
    if let Some(n) = name {
        claims["name"] = Value::from(n);
    }
    if let Some(m) = meta {
        claims["meta"] = m;
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// The token phoenix.js sends as `authToken`: subprotocol `base64url.bearer.phx.<b64>` (it uses
/// `btoa`, so accept both base64 alphabets, with or without padding).
pub fn token_from_subprotocols(header: &str) -> Option<String> {
    header.split(',').map(str::trim).find_map(|p| {
        let b64 = p.strip_prefix("base64url.bearer.phx.")?;
        let cleaned: String = b64
            .trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cleaned)
            .ok()?;
        String::from_utf8(bytes).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_only_against_its_own_hash() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn an_access_token_round_trips_and_is_not_a_user_token() {
        let k = ServerKeys::new(&"k".repeat(32), 60);
        let t = k.issue_access("u1", "admin", None);
        let c = k.verify_access(&t).unwrap();
        assert_eq!(c.sub, "u1");
        assert!(matches!(key_need(&t), Ok(KeyNeed::Server)));
        let other = ServerKeys::new(&"x".repeat(32), 60);
        assert_eq!(other.verify_access(&t).unwrap_err(), TokenError::Signature);
    }

    #[test]
    fn user_tokens_verify_with_the_current_or_a_fresh_previous_secret() {
        let t = mint_user_token("old", "acc1", "u1", 60, Some("Ann"), None);
        let keys = AccountKeys {
            current: "new".into(),
            previous: Some(("old".into(), now_ms() + 10_000)),
        };
        assert_eq!(verify_user(&t, &keys).unwrap().name.as_deref(), Some("Ann"));
        let expired = AccountKeys {
            current: "new".into(),
            previous: Some(("old".into(), now_ms() - 1)),
        };
        assert_eq!(
            verify_user(&t, &expired).unwrap_err(),
            TokenError::Signature
        );
    }

    #[test]
    fn alg_none_and_expired_tokens_are_refused() {
        // {"alg":"none","typ":"JWT"}.{"sub":"u","acc":"a","exp":9999999999}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiYWNjIjoiYSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(key_need(none), Err(TokenError::Algorithm)));
        let server = ServerKeys::new(&"k".repeat(32), 60);
        assert_eq!(
            server.verify_access(none).unwrap_err(),
            TokenError::Algorithm
        );
        // Not a JWT at all is still malformed, not an algorithm problem.
        assert!(matches!(key_need("abc.def"), Err(TokenError::Malformed)));
        assert!(matches!(key_need("a.b.c.d"), Err(TokenError::Malformed)));
        let keys = AccountKeys {
            current: "s".into(),
            previous: None,
        };
        let mut claims = serde_json::json!({"sub":"u","acc":"a","exp": 1000});
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(verify_user(&t, &keys).unwrap_err(), TokenError::Expired);
        claims["exp"] = Value::from(9_999_999_999u64);
        claims["nbf"] = Value::from(9_999_999_000u64);
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(verify_user(&t, &keys).unwrap_err(), TokenError::NotYetValid);
    }

    #[test]
    fn a_claim_of_the_wrong_format_is_invalid_claims_not_a_malformed_token() {
        let keys = AccountKeys {
            current: "s".into(),
            previous: None,
        };
        let claims =
            serde_json::json!({"sub":"u","acc":"a","exp": 9_999_999_999u64, "nbf": "soon"});
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(verify_user(&t, &keys).unwrap_err(), TokenError::Claims);
    }

    #[test]
    fn the_phoenix_js_subprotocol_token_decodes() {
        // btoa("a.b+c/d") without '=' padding, as phoenix.js sends it
        let b64 = base64::engine::general_purpose::STANDARD.encode("tok.en?>>");
        let header = format!(
            "phoenix, base64url.bearer.phx.{}",
            b64.trim_end_matches('=')
        );
        assert_eq!(
            token_from_subprotocols(&header).as_deref(),
            Some("tok.en?>>")
        );
        assert_eq!(token_from_subprotocols("phoenix"), None);
    }
}
