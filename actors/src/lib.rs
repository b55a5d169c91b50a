//! presence-actors: the OTP-style actor tree of presenced.
pub mod client_presence;
pub mod presence;
