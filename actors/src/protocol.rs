//! The Phoenix Channels V2 JSON wire format: `[join_ref, ref, topic, event, payload]`.
//! Decoding never panics and always says why a frame was refused, echoing what it could read of
//! the frame so the client can match the error to its push.

use bytestring::ByteString;
use serde::Serialize;
use serde_json::Value;

/// Every error a client can be told, as the `reason` of a `phx_reply` error or a close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("unknown_topic")]
    UnknownTopic,
    #[error("unauthorized")]
    Unauthorized,
    #[error("invalid_room_name")]
    InvalidRoomName,
    #[error("invalid_payload")]
    InvalidPayload,
    #[error("invalid_status")]
    InvalidStatus,
    #[error("meta_too_large")]
    MetaTooLarge,
    #[error("unknown_event")]
    UnknownEvent,
    #[error("not_joined")]
    NotJoined,
    #[error("too_many_joins")]
    TooManyJoins,
    #[error("malformed_frame")]
    MalformedFrame,
    #[error("frame_too_large")]
    FrameTooLarge,
    #[error("binary_not_supported")]
    BinaryNotSupported,
    #[error("room_full")]
    RoomFull,
    #[error("room_limit")]
    RoomLimit,
    #[error("plan_limit")]
    PlanLimit,
    #[error("rate_limited")]
    RateLimited,
    #[error("unavailable")]
    Unavailable,
    #[error("slow_consumer")]
    SlowConsumer,
    #[error("kicked")]
    Kicked,
    #[error("heartbeat_timeout")]
    HeartbeatTimeout,
    #[error("too_many_errors")]
    TooManyErrors,
    #[error("server_shutdown")]
    ServerShutdown,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::UnknownTopic => "unknown_topic",
            Reason::Unauthorized => "unauthorized",
            Reason::InvalidRoomName => "invalid_room_name",
            Reason::InvalidPayload => "invalid_payload",
            Reason::InvalidStatus => "invalid_status",
            Reason::MetaTooLarge => "meta_too_large",
            Reason::UnknownEvent => "unknown_event",
            Reason::NotJoined => "not_joined",
            Reason::TooManyJoins => "too_many_joins",
            Reason::MalformedFrame => "malformed_frame",
            Reason::FrameTooLarge => "frame_too_large",
            Reason::BinaryNotSupported => "binary_not_supported",
            Reason::RoomFull => "room_full",
            Reason::RoomLimit => "room_limit",
            Reason::PlanLimit => "plan_limit",
            Reason::RateLimited => "rate_limited",
            Reason::Unavailable => "unavailable",
            Reason::SlowConsumer => "slow_consumer",
            Reason::Kicked => "kicked",
            Reason::HeartbeatTimeout => "heartbeat_timeout",
            Reason::TooManyErrors => "too_many_errors",
            Reason::ServerShutdown => "server_shutdown",
        }
    }
}

/// A decoded client frame. Refs are kept as the client sent them (phoenix.js uses strings) and
/// echoed back verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct InFrame {
    pub join_ref: Value,
    pub msg_ref: Value,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

/// Why a frame could not be decoded, with whatever could be read of it for the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub reason: Reason,
    pub join_ref: Value,
    pub msg_ref: Value,
    pub topic: String,
}

impl FrameError {
    fn new(reason: Reason) -> FrameError {
        FrameError {
            reason,
            join_ref: Value::Null,
            msg_ref: Value::Null,
            topic: "phoenix".into(),
        }
    }

    /// The `phx_reply` error frame for this failure.
    pub fn reply(&self) -> ByteString {
        reply_error(&self.join_ref, &self.msg_ref, &self.topic, self.reason)
    }
}

fn is_ref(v: &Value) -> bool {
    matches!(v, Value::Null | Value::String(_) | Value::Number(_))
}

/// Decodes one text frame. `max_bytes` is the application limit; frames over it are refused
/// with `frame_too_large` but still parsed (up to the transport's hard cap) to echo their ref.
/// The error is boxed: it carries two JSON values, 80 bytes each with `preserve_order`.
pub fn decode(text: &str, max_bytes: usize) -> Result<InFrame, Box<FrameError>> {
    let parsed: Result<Value, _> = serde_json::from_str(text);
    let too_large = text.len() > max_bytes;
    let arr = match parsed {
        Ok(Value::Array(a)) => a,
        _ if too_large => return Err(Box::new(FrameError::new(Reason::FrameTooLarge))),
        _ => return Err(Box::new(FrameError::new(Reason::MalformedFrame))),
    };
    let mut err = FrameError::new(if too_large {
        Reason::FrameTooLarge
    } else {
        Reason::MalformedFrame
    });
    // Echo what we can, even from a frame we refuse.
    if let Some(v) = arr.first().filter(|v| is_ref(v)) {
        err.join_ref = v.clone();
    }
    if let Some(v) = arr.get(1).filter(|v| is_ref(v)) {
        err.msg_ref = v.clone();
    }
    if let Some(Value::String(t)) = arr.get(2) {
        if t.len() <= 256 {
            err.topic = t.clone();
        }
    }
    if too_large || arr.len() != 5 {
        return Err(Box::new(err));
    }
    let mut it = arr.into_iter();
    let join_ref = it.next().unwrap_or(Value::Null);
    let msg_ref = it.next().unwrap_or(Value::Null);
    let (Some(Value::String(topic)), Some(Value::String(event))) = (it.next(), it.next()) else {
        return Err(Box::new(err));
    };
    if !is_ref(&join_ref) || !is_ref(&msg_ref) {
        return Err(Box::new(err));
    }
    let payload = it.next().unwrap_or(Value::Null);
    Ok(InFrame {
        join_ref,
        msg_ref,
        topic,
        event,
        payload,
    })
}

/// `[join_ref, ref, topic, event, payload]`
pub fn encode<P: Serialize + ?Sized>(
    join_ref: &Value,
    msg_ref: &Value,
    topic: &str,
    event: &str,
    payload: &P,
) -> ByteString {
    // Serialising our own values cannot fail: maps have string keys and numbers are finite.
    serde_json::to_string(&(join_ref, msg_ref, topic, event, payload))
        .unwrap_or_else(|_| String::from("[null,null,\"phoenix\",\"phx_error\",{}]"))
        .into()
}

/// A server push that is the same for every subscriber (`join_ref` and `ref` null), so it is
/// serialised once and shared by reference count across the whole fan-out.
pub fn broadcast<P: Serialize + ?Sized>(topic: &str, event: &str, payload: &P) -> ByteString {
    encode(&Value::Null, &Value::Null, topic, event, payload)
}

/// `broadcast` of a payload that writes itself as JSON (`presence::State::write_json`), into
/// a buffer of the size it says it needs.
pub fn broadcast_written(
    topic: &str,
    event: &str,
    size_hint: usize,
    payload: impl FnOnce(&mut Vec<u8>),
) -> ByteString {
    let mut out = Vec::with_capacity(size_hint + topic.len() + event.len() + 24);
    out.extend_from_slice(b"[null,null,");
    let _ = serde_json::to_writer(&mut out, topic);
    out.push(b',');
    let _ = serde_json::to_writer(&mut out, event);
    out.push(b',');
    payload(&mut out);
    out.push(b']');
    match String::from_utf8(out) {
        Ok(s) => s.into(),
        Err(_) => ByteString::from_static("[null,null,\"phoenix\",\"phx_error\",{}]"),
    }
}

#[derive(Serialize)]
struct ReplyBody<'a, R: Serialize + ?Sized> {
    status: &'a str,
    response: &'a R,
}

pub fn reply_ok<R: Serialize + ?Sized>(
    join_ref: &Value,
    msg_ref: &Value,
    topic: &str,
    response: &R,
) -> ByteString {
    encode(
        join_ref,
        msg_ref,
        topic,
        "phx_reply",
        &ReplyBody {
            status: "ok",
            response,
        },
    )
}

pub fn reply_error(join_ref: &Value, msg_ref: &Value, topic: &str, reason: Reason) -> ByteString {
    encode(
        join_ref,
        msg_ref,
        topic,
        "phx_reply",
        &ReplyBody {
            status: "error",
            response: &serde_json::json!({ "reason": reason.as_str() }),
        },
    )
}

/// Room names: 1..=max bytes of `[A-Za-z0-9_.:@~-]`, so they are safe in URLs, logs and keys.
pub fn valid_room_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@~".contains(&b))
}

/// User ids: 1..=max bytes of `[A-Za-z0-9_.:@+-]` (emails and UUIDs fit).
pub fn valid_user_id(id: &str, max_len: usize) -> bool {
    !id.is_empty()
        && id.len() <= max_len
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@+".contains(&b))
}

/// Statuses: 1..=32 bytes of `[a-z0-9_-]` (`online`, `away`, `busy` or a custom one).
pub fn valid_status(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_phoenix_js_frame_decodes() {
        let f = decode(r#"["1","2","room:a","phx_join",{"status":"away"}]"#, 1000).unwrap();
        assert_eq!(f.join_ref, json!("1"));
        assert_eq!(f.msg_ref, json!("2"));
        assert_eq!(f.topic, "room:a");
        assert_eq!(f.event, "phx_join");
        assert_eq!(f.payload, json!({"status":"away"}));
    }

    #[test]
    fn malformed_frames_are_refused_with_what_could_be_read() {
        for bad in [
            "not json",
            "{}",
            "[]",
            r#"["1","2","t","e"]"#,
            r#"["1","2","t","e",{},6]"#,
            r#"[{},"2","t","e",{}]"#,
            r#"["1","2",3,"e",{}]"#,
            r#"["1","2","t",null,{}]"#,
            r#"["1","2","bad\ud800","e",{}]"#,
        ] {
            let e = decode(bad, 1000).unwrap_err();
            assert_eq!(e.reason, Reason::MalformedFrame, "{bad}");
        }
        let e = decode(r#"["1","7","room:x","e"]"#, 1000).unwrap_err();
        assert_eq!(e.msg_ref, json!("7"));
        assert_eq!(e.topic, "room:x");
        let v: Value = serde_json::from_str(&e.reply()).unwrap();
        assert_eq!(
            v,
            json!(["1","7","room:x","phx_reply",{"status":"error","response":{"reason":"malformed_frame"}}])
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_but_its_ref_is_echoed() {
        let big = format!(
            r#"["1","9","room:a","status",{{"x":"{}"}}]"#,
            "a".repeat(200)
        );
        let e = decode(&big, 100).unwrap_err();
        assert_eq!(e.reason, Reason::FrameTooLarge);
        assert_eq!(e.msg_ref, json!("9"));
        let e = decode(&"x".repeat(200), 100).unwrap_err();
        assert_eq!(e.reason, Reason::FrameTooLarge);
    }

    #[test]
    fn names_ids_and_statuses_are_checked() {
        assert!(valid_room_name("lobby-1.eu:general", 128));
        assert!(!valid_room_name("", 128));
        assert!(!valid_room_name("has space", 128));
        assert!(!valid_room_name(&"a".repeat(129), 128));
        assert!(!valid_room_name("ünicode", 128));
        assert!(valid_user_id("ann@example.com", 128));
        assert!(!valid_user_id("<img>", 128));
        assert!(valid_status("online"));
        assert!(!valid_status("Online!"));
    }

    #[test]
    fn replies_have_the_phoenix_shape() {
        let r = reply_ok(&json!("1"), &json!("2"), "room:a", &json!({}));
        let v: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            v,
            json!(["1","2","room:a","phx_reply",{"status":"ok","response":{}}])
        );
    }
}
