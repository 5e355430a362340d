//! The request path: the service-port server, the route table, ingress header hygiene, the
//! upstream client, primary discovery and the 503s. Owner: proxy work (issue 3).
//!
//! - [`server`]: the service port: threads, limits, graceful drain;
//! - [`h1_server`]: plain HTTP/1.1 requests without hyper; the rest goes to hyper (h2c too);
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
pub mod h1_server;
pub mod headers;
pub mod metrics;
pub mod pool;
pub mod route;
pub mod server;
pub mod sniff;
pub mod upstream;
