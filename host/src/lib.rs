//! sluice: a self-hosted, programmable tunnel.
//!
//! A connector beside private services dials out over QUIC to an edge; the edge sends public
//! HTTP requests for the tunnel's hostnames back down those connections, and the connector
//! proxies them to origins.
//!
//! # Layout
//! - [`admin`]: `/live`, `/ready` and `/metrics` on an admin listener.
//! - [`audit`]: audit events and their sinks.
//! - [`authority`]: the validator of `Host` and `:authority`.
//! - [`plugin`]: the Wasm plugin runtime, hooks and decisions.
//! - [`proto`]: the wire protocol between connector and edge, sans-IO.
//! - [`config`]: TOML configuration of both roles, validated with precise errors.
//! - [`edge`]: client listeners, connector acceptor and auth, tunnel registry, dispatch.
//! - [`connector`]: dial loop with back-off, sessions, the per-stream pipeline.
//! - [`ingress`]: path normalisation and first-match rules.
//! - [`origin`]: HTTP/1.1 client pools, TLS to origins, built-in origins.
//! - [`transport`]: QUIC, and HTTP/2 on TLS over TCP, behind one connection and stream model.
//! - [`relay`]: bodies and upgraded sockets across QUIC streams, with back-pressure.
//! - [`headers`]: hop-by-hop rules and header conversions.
//! - [`tls`]: rustls configurations for every hop.
//! - [`demo`]: edge, connector and origin in one process, on loopback.
//! - [`secret`]: a string that never prints itself.

pub mod access;
pub mod admin;
pub mod audit;
pub mod authority;
pub mod certs;
pub mod config;
pub mod connector;
pub mod demo;
pub mod edge;
pub mod headers;
pub mod ingress;
pub mod net;
pub mod origin;
pub mod plugin;
pub mod proto;
pub mod relay;
pub mod secret;
pub mod services;
pub mod tls;
pub mod transport;
pub mod wake;
