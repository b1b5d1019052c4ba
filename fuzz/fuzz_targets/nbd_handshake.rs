//! A whole NBD connection (handshake + transmission) driven by arbitrary client bytes.
//!
//! The fuzz input is everything the client sends; then the client half-closes
//! and drains the server's output. `serve_connection` runs on a current-thread
//! tokio runtime against an in-memory export over `tokio::io::duplex`.
//!
//! Oracles: no panic anywhere (server, spawned request tasks); the export is
//! only ever called with in-range requests (validation happens before the
//! export is touched); the connection ends within a few seconds (no hang once
//! the client is done); the server's first bytes are the fixed-newstyle greeting.
#![no_main]

use std::io;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mars_nbd::proto::*;
use mars_nbd::{BoxFut, Export, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// In-memory export that panics on any request the server should have rejected.
struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemExport {
    fn range(&self, offset: u64, len: u64, what: &str) -> std::ops::Range<usize> {
        let size = self.data.lock().unwrap().len() as u64;
        let end = offset
            .checked_add(len)
            .unwrap_or_else(|| panic!("{what}: offset {offset} + len {len} overflows"));
        assert!(
            end <= size,
            "{what}: range {offset}+{len} past end of export ({size})"
        );
        assert!(len > 0, "{what}: zero-length request reached the export");
        offset as usize..end as usize
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, len: u32) -> BoxFut<io::Result<Bytes>> {
        let r = self.range(offset, len.into(), "read");
        let out = Bytes::copy_from_slice(&self.data.lock().unwrap()[r]);
        Box::pin(async move { Ok(out) })
    }
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFut<io::Result<()>> {
        assert!(!self.read_only, "write reached a read-only export");
        let r = self.range(offset, data.len() as u64, "write");
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFut<io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, offset: u64, len: u32, _fua: bool) -> BoxFut<io::Result<()>> {
        assert!(!self.read_only, "trim reached a read-only export");
        let r = self.range(offset, len.into(), "trim");
        self.data.lock().unwrap()[r].fill(0);
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> BoxFut<io::Result<()>> {
        assert!(!self.read_only, "write_zeroes reached a read-only export");
        let r = self.range(offset, len.into(), "write_zeroes");
        self.data.lock().unwrap()[r].fill(0);
        Box::pin(async { Ok(()) })
    }
}

struct MemRegistry {
    exports: Vec<(String, Arc<MemExport>)>,
}

impl Registry for MemRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| Arc::clone(e) as Arc<dyn Export>)
    }
    fn list(&self) -> Vec<String> {
        self.exports.iter().map(|(n, _)| n.clone()).collect()
    }
}

fn registry() -> Arc<MemRegistry> {
    // Filled once: a per-run byte loop would dominate the run time (every
    // comparison in it is instrumented).
    static PATTERN: LazyLock<Vec<u8>> =
        LazyLock::new(|| (0..64 * 1024).map(|i| (i % 251) as u8).collect());
    let mk = |size: usize, read_only: bool| {
        Arc::new(MemExport {
            data: Mutex::new(PATTERN[..size].to_vec()),
            read_only,
        })
    };
    Arc::new(MemRegistry {
        exports: vec![
            ("disk".to_string(), mk(64 * 1024, false)),
            ("ro".to_string(), mk(4096, true)),
            (String::new(), mk(512, false)),
        ],
    })
}

thread_local! {
    /// One current-thread runtime, reused: every connection's tasks (server,
    /// request tasks, client halves) have finished when `block_on` returns.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
}

/// Wall-clock bound for one connection; the client has sent everything and
/// half-closed, so the server has no reason to wait.
const HANG: Duration = Duration::from_secs(10);

fuzz_target!(|data: &[u8]| {
    let input = data.to_vec();
    RUNTIME.with(|rt| {
        rt.block_on(async move {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(mars_nbd::serve_connection(server, registry()));
            let (mut crd, mut cwr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                // The server may close early: write errors are expected.
                let _ = cwr.write_all(&input).await;
                let _ = cwr.shutdown().await;
                cwr
            });
            let reader = tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match crd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if head.len() < 18 {
                                let take = n.min(18 - head.len());
                                head.extend_from_slice(&buf[..take]);
                            }
                        }
                    }
                }
                head
            });
            let res = tokio::time::timeout(HANG, server)
                .await
                .expect("serve_connection hung after the client finished sending");
            // A panic in serve_connection or its request tasks surfaces here.
            let _ = res.expect("serve_connection panicked");
            // The client halves hold the other end open: drop the writer's half so
            // the reader sees EOF once the server's half is gone.
            let cwr = tokio::time::timeout(HANG, writer)
                .await
                .expect("client writer hung")
                .expect("client writer panicked");
            drop(cwr);
            let head = tokio::time::timeout(HANG, reader)
                .await
                .expect("client reader hung")
                .expect("client reader panicked");
            assert_eq!(head.len(), 18, "server did not send the full greeting");
            assert_eq!(&head[0..8], &NBDMAGIC.to_be_bytes());
            assert_eq!(&head[8..16], &IHAVEOPT.to_be_bytes());
        })
    });
});
