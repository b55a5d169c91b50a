//! presenced: the server crate. Configuration, the Diesel store, authentication, the actix-web
//! routes and the WebSocket transport, wired to the actor tree of `presence-actors` in `app`.
pub mod store;
