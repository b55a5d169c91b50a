//! presenced: the server crate. Configuration, the Diesel store, authentication, the actix-web
//! routes and the WebSocket transport, wired to the actor tree of `presence-actors` in `app`.
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod http;
pub mod limits;
pub mod load;
pub mod persist;
pub mod store;
pub mod usage;
