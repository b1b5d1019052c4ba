//! Replication of a resource between its members.
//!
//! - [`policy`]: the rules, pure (no tokio, no files, no clock): what a member
//!   offers (the durable clamp), whom a member copies from, which of the
//!   source's logfiles it takes, what its disk is shown as. The daemon and the
//!   seeded simulations both run them.
//! - [`secondary`]: a secondary's loop: full sync ([`sync`]), fetch of
//!   logfiles ([`fetch`]) and replay onto the local disk.
//! - [`serve`]: the source side: what a member answers to those.
//! - [`logdir`]: reading a resource directory's logfiles for fetchers.
//!
//! The crate knows the cluster only through [`Cluster`] (the metadata store,
//! who is alive, connections to members): it does not depend on the daemon.

pub mod digest;
pub mod fetch;
pub mod io;
pub mod logdir;
pub mod policy;
pub mod progress;
pub mod secondary;
pub mod serve;
pub mod state;
pub mod sync;
pub mod verify;

pub use mars_meta::schema as meta;
pub use progress::{LagClock, Progress, LAG_CLOCK_FILE};
pub use secondary::{Secondary, FETCHED_KEEP};
pub use serve::{LinkStats, Served, ServedResource, ServedSecondary, Server};
pub use state::{clear_sync, mark_synced, persisted_replayed, synced_start};

use std::future::Future;
use std::pin::Pin;

/// A peer link: TLS over TCP, either side.
pub type PeerStream = tokio_rustls::TlsStream<tokio::net::TcpStream>;

/// What replication needs of the cluster.
pub trait Cluster: Send + Sync + 'static {
    /// The metadata store (locked only for a lookup, never across an await).
    fn store(&self) -> &parking_lot::Mutex<mars_meta::Store>;
    /// Whether `node` is alive in the cluster's view.
    fn is_alive(&self, node: &str) -> bool;
    /// Whether links to `node` are cut on purpose (`marsadm debug-block`):
    /// a kept connection to it is not used again either.
    fn is_blocked(&self, _node: &str) -> bool {
        false
    }
    /// A connection to `node`, handshake done.
    fn connect<'a>(
        &'a self,
        node: &'a str,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<PeerStream>> + Send + 'a>>;
}
