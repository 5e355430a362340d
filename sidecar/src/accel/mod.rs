//! Secondary read acceleration (DESIGN §3): serve authorized, provably fresh Git fetches
//! from the local replica.
//!
//! The decision, per `POST …/git-upload-pack`:
//!
//! | condition                                                   | outcome                       |
//! |-------------------------------------------------------------|-------------------------------|
//! | no authorization entry for this client and repository       | proxy (`no_authorization`)    |
//! | a `want` the primary did not advertise to this client       | proxy (`want_not_advertised`) |
//! | a capability or argument the local git cannot honour        | proxy (`capability`)          |
//! | a `want` missing from the replica                           | proxy + queue sync (`wants_missing`) |
//! | otherwise                                                   | local `git upload-pack`       |

pub mod advert;
pub mod authcache;
pub mod engine;
pub mod lfs;
pub mod local;
pub mod metrics;
pub mod pktline;
pub mod request;

pub use engine::{Accelerator, Intercept, Pending};
