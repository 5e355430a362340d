//! The request path: the service-port server, the route table, ingress header hygiene, the
//! upstream client, primary discovery and the 503s. Owner: proxy work (issue 3).
//!
//! - [`server`]: hyper 1 (HTTP/1.1 + h2c), limits, graceful drain;
//! - [`front`]: the per-request phases (request filter → pick target → serve → response filter);
//! - [`route`]: the route table ([`route::Target`]) and the acceleration hook;
//! - [`headers`]: hop-by-hop, forwarding, Geo header and rewrite rules;
//! - [`upstream`]: the client, streaming, retries, Upgrade tunnelling;
//! - [`pool`]: idle upstream connections, per thread;
//! - [`coarse_timer`]: the I/O threads' cheap timeouts;
//! - [`drain`]: graceful drain of an I/O thread's connections;
//! - [`discovery`]: the primary URL of a secondary.

pub mod coarse_timer;
pub mod discovery;
pub mod drain;
pub mod front;
pub mod h1;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod route;
pub mod server;
pub mod sniff;
pub mod upstream;
