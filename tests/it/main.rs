//! Integration tests: real nodes on port 0, real sockets, real SQLite files. One binary, so the
//! suite links once.
mod accounts;
mod cluster;
mod conformance;
mod dashboard;
mod demo;
mod floor;
mod helpers;
mod http;
mod load;
mod persistence;
mod plans;
mod roles;
mod security;
mod socket;
