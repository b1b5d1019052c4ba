//! Shared test helpers: an in-memory export, a registry and a raw NBD client.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mars_nbd::proto::*;
use mars_nbd::{BoxFut, Export, NbdError, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

pub type DelayFn = Box<dyn Fn(u64) -> Option<Duration> + Send + Sync>;

/// In-memory export; counts backend calls.
pub struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub read_only: AtomicBool,
    pub reads: AtomicUsize,
    pub writes: AtomicUsize,
    pub flushes: AtomicUsize,
    pub trims: AtomicUsize,
    pub zeroes: AtomicUsize,
    pub fua_ops: AtomicUsize,
    /// Optional per-read delay keyed by offset.
    pub read_delay: Option<DelayFn>,
    /// When set, every write fails with this error kind.
    pub fail_writes: Mutex<Option<io::ErrorKind>>,
}

impl MemExport {
    pub fn new(size: usize) -> MemExport {
        MemExport {
            data: Mutex::new(vec![0u8; size]),
            read_only: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            trims: AtomicUsize::new(0),
            zeroes: AtomicUsize::new(0),
            fua_ops: AtomicUsize::new(0),
            read_delay: None,
            fail_writes: Mutex::new(None),
        }
    }

    /// Export whose byte at offset i is `(i % 251) as u8`.
    pub fn patterned(size: usize) -> MemExport {
        let e = MemExport::new(size);
        for (i, b) in e.data.lock().unwrap().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        e
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn backend_calls(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
            + self.writes.load(Ordering::SeqCst)
            + self.flushes.load(Ordering::SeqCst)
            + self.trims.load(Ordering::SeqCst)
            + self.zeroes.load(Ordering::SeqCst)
    }

    fn fill(&self, offset: u64, len: u32, fua: bool) {
        if fua {
            self.fua_ops.fetch_add(1, Ordering::SeqCst);
        }
        let mut d = self.data.lock().unwrap();
        let s = offset as usize;
        d[s..s + len as usize].fill(0);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }
    fn read(&self, offset: u64, len: u32) -> BoxFut<io::Result<Bytes>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let s = offset as usize;
        let out = Bytes::copy_from_slice(&self.data.lock().unwrap()[s..s + len as usize]);
        let delay = self.read_delay.as_ref().and_then(|f| f(offset));
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            Ok(out)
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFut<io::Result<()>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if let Some(kind) = *self.fail_writes.lock().unwrap() {
            return Box::pin(async move { Err(io::Error::new(kind, "injected")) });
        }
        if fua {
            self.fua_ops.fetch_add(1, Ordering::SeqCst);
        }
        let s = offset as usize;
        self.data.lock().unwrap()[s..s + data.len()].copy_from_slice(&data);
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFut<io::Result<()>> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFut<io::Result<()>> {
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, fua);
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFut<io::Result<()>> {
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, fua);
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
pub struct MemRegistry {
    pub exports: Vec<(String, Arc<MemExport>)>,
}

impl MemRegistry {
    pub fn with(name: &str, e: MemExport) -> (Arc<MemRegistry>, Arc<MemExport>) {
        let e = Arc::new(e);
        let reg = MemRegistry {
            exports: vec![(name.to_string(), Arc::clone(&e))],
        };
        (Arc::new(reg), e)
    }
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

pub const T: Duration = Duration::from_secs(10);

/// Start `serve_connection` on one end of an in-memory pipe.
pub fn start(reg: Arc<MemRegistry>) -> (DuplexStream, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(4 * 1024 * 1024);
    let h = tokio::spawn(mars_nbd::serve_connection(server, reg));
    (client, h)
}

/// Wait for the server task with a timeout; panics if it hangs or panicked.
pub async fn finish(h: JoinHandle<Result<(), NbdError>>) -> Result<(), NbdError> {
    tokio::time::timeout(T, h)
        .await
        .expect("server task hung")
        .expect("server task panicked")
}

/// Read the server greeting and send client flags; returns the handshake flags.
pub async fn hello(s: &mut DuplexStream, client_flags: u32) -> u16 {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
    u16::from_be_bytes([g[16], g[17]])
}

pub async fn send_option(s: &mut DuplexStream, opt: u32, data: &[u8]) {
    s.write_all(&encode_option_header(opt, data.len() as u32))
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
}

pub async fn read_opt_reply(s: &mut DuplexStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .expect("timeout waiting for option reply")
        .unwrap();
    let (opt, typ, len) = parse_option_reply_header(&h).unwrap();
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, typ, d)
}

/// Expect that the server closed the connection (EOF) within the timeout.
pub async fn expect_eof(s: &mut DuplexStream) {
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("timeout waiting for close")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected connection close");
}

/// Full fixed-newstyle handshake with NBD_OPT_GO; returns (size, transmission flags).
pub async fn connect_go(
    reg: Arc<MemRegistry>,
    name: &str,
) -> (DuplexStream, JoinHandle<Result<(), NbdError>>, u64, u16) {
    let (mut s, h) = start(reg);
    hello(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).await;
    send_option(
        &mut s,
        NBD_OPT_GO,
        &encode_info_request(name.as_bytes(), &[NBD_INFO_BLOCK_SIZE]),
    )
    .await;
    let (mut size, mut flags) = (None, None);
    loop {
        let (opt, typ, d) = read_opt_reply(&mut s).await;
        assert_eq!(opt, NBD_OPT_GO);
        match typ {
            NBD_REP_INFO => {
                if u16::from_be_bytes([d[0], d[1]]) == NBD_INFO_EXPORT {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                    flags = Some(u16::from_be_bytes([d[10], d[11]]));
                }
            }
            NBD_REP_ACK => break,
            other => panic!("unexpected GO reply {other:#x}"),
        }
    }
    (s, h, size.unwrap(), flags.unwrap())
}

pub async fn send_req(
    s: &mut DuplexStream,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    let r = Request {
        flags,
        kind: mars_nbd::Command::from_u16(kind),
        cookie,
        offset,
        length,
    };
    let mut b = encode_request(&r).to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).await.unwrap();
}

/// Read one simple reply header: (error, cookie).
pub async fn read_reply(s: &mut DuplexStream) -> (u32, u64) {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .expect("timeout waiting for reply")
        .unwrap();
    parse_simple_reply(&h).unwrap()
}

pub async fn read_data(s: &mut DuplexStream, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    tokio::time::timeout(T, s.read_exact(&mut d))
        .await
        .expect("timeout reading data")
        .unwrap();
    d
}

/// Request + reply for a command without payloads; returns the error.
pub async fn simple_cmd(
    s: &mut DuplexStream,
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
) -> u32 {
    send_req(s, kind, flags, 77, offset, length, &[]).await;
    let (err, cookie) = read_reply(s).await;
    assert_eq!(cookie, 77);
    err
}

pub async fn write(s: &mut DuplexStream, flags: u16, offset: u64, data: &[u8]) -> u32 {
    send_req(s, NBD_CMD_WRITE, flags, 55, offset, data.len() as u32, data).await;
    let (err, cookie) = read_reply(s).await;
    assert_eq!(cookie, 55);
    err
}

pub async fn read(s: &mut DuplexStream, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
    send_req(s, NBD_CMD_READ, 0, 66, offset, len, &[]).await;
    let (err, cookie) = read_reply(s).await;
    assert_eq!(cookie, 66);
    if err != 0 {
        return Err(err);
    }
    Ok(read_data(s, len as usize).await)
}

pub async fn disconnect(mut s: DuplexStream, h: JoinHandle<Result<(), NbdError>>) {
    send_req(&mut s, NBD_CMD_DISC, 0, 0, 0, 0, &[]).await;
    expect_eof(&mut s).await;
    finish(h).await.expect("server returned error");
}
