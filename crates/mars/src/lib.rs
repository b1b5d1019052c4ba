//! The `marsd` daemon and the `marsadm` tool.
//!
//! - [`node`]: the node directory (identity, settings) and resource desired state on disk.
//! - [`daemon`]: desired state, actual state and the control loop that converges them.
//! - [`control`]: the control socket `marsadm` talks to.
//! - [`metrics`]: the Prometheus metrics endpoint (`marsd --metrics HOST:PORT`).
//! - [`nbd_tls`]: the NBD server's TLS and client-address settings.
//! - [`dumplog`]: `marsadm dump-log`, the incident tool for logfiles.
//! - [`manpage`]: man pages from the clap definitions.
//! - [`systemd`]: readiness, watchdog and per-resource units.

pub mod control;
pub mod daemon;
pub use mars_replication::digest;
pub mod dumplog;
pub mod manpage;
pub mod meta;
pub mod metrics;
pub mod nbd_tls;
pub mod node;
pub mod peer;
pub mod scrub;
pub mod systemd;
pub mod tls;
pub mod verify;
