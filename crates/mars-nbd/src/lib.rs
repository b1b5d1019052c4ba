//! NBD (network block device) server library.
//!
//! # Handshake
//! Fixed newstyle only. The server sends `NBDMAGIC`, `IHAVEOPT` and the handshake
//! flags `FIXED_NEWSTYLE | NO_ZEROES`; a client whose flags lack
//! `NBD_FLAG_C_FIXED_NEWSTYLE` (or carry unknown bits) is disconnected. Supported
//! options: `EXPORT_NAME` (unknown export: hard disconnect, as the spec requires;
//! the 124 zero bytes are omitted when the client set `NO_ZEROES`), `GO`/`INFO`
//! (reply `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE` = 1/4096/32 MiB, and
//! `NBD_INFO_NAME` when asked; unknown export: `ERR_UNKNOWN`), `LIST` and `ABORT`
//! (ACK, then close). Everything else (`STRUCTURED_REPLY`, `STARTTLS`, meta
//! contexts, extended headers, ...) gets `ERR_UNSUP`: only simple replies are used.
//! Malformed payloads get `ERR_INVALID`; payloads over 64 KiB get `ERR_TOO_BIG` and
//! the connection is closed without reading them. The handshake must complete
//! within [`HANDSHAKE_TIMEOUT`]. The empty export name is not
//! special: it is looked up in the [`Registry`] like any other name.
//!
//! Transmission flags: `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
//! SEND_WRITE_ZEROES | CAN_MULTI_CONN`, plus `READ_ONLY` if [`Export::read_only`].
//!
//! # Transmission
//! One reader loop per connection parses requests and validates them before the
//! export is touched; each valid request runs in its own tokio task, so requests
//! complete (and are answered) out of order. In-flight work is bounded per
//! connection to [`MAX_IN_FLIGHT`] requests and [`MAX_BUFFERED_BYTES`] of read/write
//! payload. Replies go through an mpsc channel to a single writer task that
//! batches them in one buffer and writes whenever the queue is momentarily empty
//! (large read payloads go out with a vectored write instead of being copied).
//! WRITE payloads are read once, straight into a `BytesMut`, and frozen.
//! `NBD_CMD_DISC` or EOF stops reading; in-flight requests are finished and
//! answered, then the connection is closed.
//!
//! Validation (error replies, export untouched): unknown command (incl. CACHE and
//! BLOCK_STATUS, never advertised) → `EINVAL`; flag not valid for the command →
//! `EINVAL` (`FUA` is accepted everywhere, `NO_HOLE` on WRITE_ZEROES); READ/WRITE
//! longer than 32 MiB → `EINVAL` (a WRITE that long closes the connection instead
//! of reading its payload); FLUSH with nonzero offset/length → `EINVAL`; range past
//! the end or overflowing → `ENOSPC` for WRITE/WRITE_ZEROES, `EINVAL` for
//! READ/TRIM; WRITE/TRIM/WRITE_ZEROES on a read-only export → `EPERM` (payload
//! still consumed); zero-length READ/WRITE/TRIM/WRITE_ZEROES → success without
//! calling the export. A bad request magic closes the connection.
//!
//! # Errno mapping (backend `io::Error` → NBD error)
//! * kind `NotConnected`, `BrokenPipe`, `ConnectionAborted`, `ConnectionReset` →
//!   `ESHUTDOWN`; the export is considered gone: no more requests are read, the
//!   in-flight ones are answered, then the connection is closed.
//! * raw `ENOSPC`, `EDQUOT`, `EFBIG` → `ENOSPC`
//! * kind `PermissionDenied`, raw `EPERM`, `EACCES`, `EROFS` → `EPERM`
//! * kind `InvalidInput`, `Unsupported`, raw `EINVAL` → `EINVAL`
//! * everything else → `EIO` (also a READ returning the wrong number of bytes).
//!
//! [`serve`] sets `TCP_NODELAY` on accepted sockets; callers of
//! [`serve_connection`] with their own TCP streams should do the same.

pub mod proto;

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use proto::*;

pub use proto::{Command, ProtoError, Request};

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One exported block device. Implemented by the daemon's transaction logger.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// false when the device can no longer accept writes (read-only export).
    /// Advertise NBD_FLAG_READ_ONLY then.
    fn read_only(&self) -> bool {
        false
    }
    /// Must return exactly `len` bytes.
    fn read(&self, offset: u64, len: u32) -> BoxFut<io::Result<Bytes>>;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFut<io::Result<()>>;
    fn flush(&self) -> BoxFut<io::Result<()>>;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFut<io::Result<()>>;
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFut<io::Result<()>>;
}

/// Name -> export lookup, consulted at handshake time (export names = resource names).
pub trait Registry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn list(&self) -> Vec<String>;
}

/// Errors ending one connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Proto(#[from] ProtoError),
    #[error("unsupported client flags {0:#x} (fixed newstyle required)")]
    ClientFlags(u32),
    #[error("option {option} payload of {len} bytes is too large")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("write payload of {0} bytes is too large")]
    PayloadTooLarge(u32),
    #[error("writer task failed: {0}")]
    Writer(String),
}

/// Largest READ/WRITE length accepted (also advertised as maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option payload read during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Maximum requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Maximum read/write payload bytes buffered per connection.
pub const MAX_BUFFERED_BYTES: usize = 128 * 1024 * 1024;

/// The whole option haggling must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;
const READ_BUF_CAP: usize = 256 * 1024;
const WRITE_BUF_CAP: usize = 256 * 1024;
/// Read payloads up to this size are copied into the batch buffer; larger ones
/// are written with a vectored write.
const INLINE_DATA_MAX: usize = 32 * 1024;

// Linux errno values used to classify raw OS errors.
const OS_EPERM: i32 = 1;
const OS_EACCES: i32 = 13;
const OS_EFBIG: i32 = 27;
const OS_ENOSPC: i32 = 28;
const OS_EROFS: i32 = 30;
const OS_EINVAL: i32 = 22;
const OS_EDQUOT: i32 = 122;

/// Map a backend error to an NBD error value (see the crate docs).
pub fn errno_for(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    match e.kind() {
        K::NotConnected | K::BrokenPipe | K::ConnectionAborted | K::ConnectionReset => {
            return NBD_ESHUTDOWN
        }
        K::PermissionDenied => return NBD_EPERM,
        K::InvalidInput | K::Unsupported => return NBD_EINVAL,
        _ => {}
    }
    match e.raw_os_error() {
        Some(OS_ENOSPC | OS_EDQUOT | OS_EFBIG) => NBD_ENOSPC,
        Some(OS_EPERM | OS_EACCES | OS_EROFS) => NBD_EPERM,
        Some(OS_EINVAL) => NBD_EINVAL,
        _ => NBD_EIO,
    }
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        f |= NBD_FLAG_READ_ONLY;
    }
    f
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock | K::TimedOut
    ) {
        return true;
    }
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: resource exhaustion, retry later.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Accept connections forever (each connection its own task); returns only on
/// listener error. Transient accept errors (aborted connections, fd exhaustion)
/// are logged and retried. Connection errors are logged and end only that
/// connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<dyn Registry>,
) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) if is_transient_accept_error(&e) => {
                tracing::warn!(error = %e, "nbd: transient accept error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "nbd: cannot set TCP_NODELAY");
        }
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            tracing::debug!(%peer, "nbd: connection accepted");
            match serve_tcp(stream, registry).await {
                Ok(()) => tracing::debug!(%peer, "nbd: connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "nbd: connection ended with error"),
            }
        });
    }
}

/// Serve one already-accepted connection (handshake + transmission).
pub async fn serve_connection<S>(stream: S, registry: Arc<dyn Registry>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = BufReader::with_capacity(READ_BUF_CAP, stream);
    let Some((name, export)) = handshake_with_timeout(&mut conn, &*registry).await? else {
        return Ok(());
    };
    tracing::debug!(export = %name, "nbd: entering transmission");
    // The read half keeps the BufReader, so pipelined bytes are not lost.
    let (rd, wr) = tokio::io::split(conn);
    transmission(rd, wr, export).await
}

/// [`serve_connection`] for TCP: after the handshake the socket is split with
/// `into_split` (no lock shared between the reader and the writer task).
async fn serve_tcp(stream: TcpStream, registry: Arc<dyn Registry>) -> Result<(), NbdError> {
    let mut conn = BufReader::with_capacity(READ_BUF_CAP, stream);
    let Some((name, export)) = handshake_with_timeout(&mut conn, &*registry).await? else {
        return Ok(());
    };
    tracing::debug!(export = %name, "nbd: entering transmission");
    // Requests the client pipelined behind NBD_OPT_GO may already be buffered.
    let leftover = Bytes::copy_from_slice(conn.buffer());
    let (r, w) = conn.into_inner().into_split();
    let rd = BufReader::with_capacity(READ_BUF_CAP, io::Cursor::new(leftover).chain(r));
    transmission(rd, w, export).await
}

// ======================================================================= handshake

async fn handshake_with_timeout<S>(
    conn: &mut BufReader<S>,
    registry: &dyn Registry,
) -> Result<Option<(String, Arc<dyn Export>)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(conn, registry)).await {
        Ok(r) => r,
        Err(_) => Err(NbdError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake timed out",
        ))),
    }
}

/// Returns the chosen export, or None when the client aborted / went away.
async fn handshake<S>(
    conn: &mut BufReader<S>,
    registry: &dyn Registry,
) -> Result<Option<(String, Arc<dyn Export>)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello).await?;
    conn.flush().await?;

    let client_flags = conn.read_u32().await?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 || client_flags & !known != 0 {
        return Err(NbdError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;

    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match conn.read_exact(&mut hdr).await {
            Ok(_) => {}
            // Client hung up between options: not an error worth reporting.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let (option, len) = parse_option_header(&hdr)?;
        out.clear();
        if len > MAX_OPTION_LEN {
            if option != NBD_OPT_EXPORT_NAME {
                put_option_reply(
                    &mut out,
                    option,
                    NBD_REP_ERR_TOO_BIG,
                    b"option payload too large",
                );
                conn.write_all(&out).await?;
                conn.flush().await?;
            }
            return Err(NbdError::OptionTooLarge { option, len });
        }
        let mut payload = vec![0u8; len as usize];
        conn.read_exact(&mut payload).await?;

        match option {
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&payload).into_owned();
                let export = std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|n| registry.lookup(n));
                let Some(export) = export else {
                    // The spec leaves no way to report an error here.
                    return Err(NbdError::UnknownExport(name));
                };
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&out).await?;
                conn.flush().await?;
                return Ok(Some((name, export)));
            }
            NBD_OPT_ABORT => {
                // Any payload is ignored, as the spec recommends.
                put_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                // The client may already have closed: ignore errors.
                let _ = conn.write_all(&out).await;
                let _ = conn.flush().await;
                let _ = conn.shutdown().await;
                return Ok(None);
            }
            NBD_OPT_LIST => {
                if payload.is_empty() {
                    for name in registry.list() {
                        if name.len() > MAX_STRING_LEN {
                            continue;
                        }
                        let mut data = Vec::with_capacity(4 + name.len());
                        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        data.extend_from_slice(name.as_bytes());
                        put_option_reply(&mut out, option, NBD_REP_SERVER, &data);
                    }
                    put_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                } else {
                    put_option_reply(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => match parse_info_request(&payload) {
                Err(e) => {
                    let msg = e.to_string();
                    put_option_reply(&mut out, option, NBD_REP_ERR_INVALID, msg.as_bytes());
                }
                Ok(req) => match registry.lookup(&req.name) {
                    None => {
                        put_option_reply(&mut out, option, NBD_REP_ERR_UNKNOWN, b"unknown export");
                    }
                    Some(export) => {
                        let mut info = [0u8; 12];
                        info[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
                        info[2..10].copy_from_slice(&export.size().to_be_bytes());
                        info[10..12].copy_from_slice(&transmission_flags(&*export).to_be_bytes());
                        put_option_reply(&mut out, option, NBD_REP_INFO, &info);

                        let mut bs = [0u8; 14];
                        bs[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
                        bs[2..6].copy_from_slice(&MIN_BLOCK.to_be_bytes());
                        bs[6..10].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                        bs[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        put_option_reply(&mut out, option, NBD_REP_INFO, &bs);

                        if req.requests.contains(&NBD_INFO_NAME) {
                            let mut data = Vec::with_capacity(2 + req.name.len());
                            data.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
                            data.extend_from_slice(req.name.as_bytes());
                            put_option_reply(&mut out, option, NBD_REP_INFO, &data);
                        }
                        put_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                        if option == NBD_OPT_GO {
                            conn.write_all(&out).await?;
                            conn.flush().await?;
                            return Ok(Some((req.name, export)));
                        }
                    }
                },
            },
            _ => {
                put_option_reply(&mut out, option, NBD_REP_ERR_UNSUP, b"option not supported");
            }
        }
        conn.write_all(&out).await?;
        conn.flush().await?;
    }
}

// ======================================================================= transmission

/// Resources a request holds until its reply has been written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    _permits: Option<Permits>,
}

/// State shared by the reader loop, the request tasks and the writer.
struct Shared {
    /// Set when the connection must stop reading requests (export gone or
    /// writer failed).
    stop: AtomicBool,
    notify: Notify,
}

impl Shared {
    fn stop(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

enum End {
    /// DISC, EOF at a request boundary, or stop requested.
    Clean,
    /// Protocol violation: close after in-flight requests.
    Error(NbdError),
}

async fn transmission<R, W>(mut rd: R, wr: W, export: Arc<dyn Export>) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Unbounded is fine: the number of queued replies is bounded by the slot semaphore.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        notify: Notify::new(),
    });
    let writer = tokio::spawn(writer_task(wr, rx, Arc::clone(&shared)));

    let end = reader_loop(&mut rd, &export, &tx, &shared).await;

    // Finish: the writer exits once every request task has dropped its sender.
    drop(tx);
    let wres = writer.await;
    match end {
        End::Error(e) => Err(e),
        End::Clean => match wres {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NbdError::Io(e)),
            Err(e) => Err(NbdError::Writer(e.to_string())),
        },
    }
}

/// Validate a request against the export; returns the NBD error to reply with.
fn validate(req: &Request, size: u64, read_only: bool) -> Result<(), u32> {
    let allowed = match req.kind {
        Command::Read | Command::Write | Command::Flush | Command::Trim => NBD_CMD_FLAG_FUA,
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        // Unknown / never advertised commands.
        _ => return Err(NBD_EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }
    if matches!(req.kind, Command::Flush) {
        return if req.offset == 0 && req.length == 0 {
            Ok(())
        } else {
            Err(NBD_EINVAL)
        };
    }
    let is_write = matches!(req.kind, Command::Write | Command::WriteZeroes);
    if read_only && (is_write || matches!(req.kind, Command::Trim)) {
        return Err(NBD_EPERM);
    }
    if matches!(req.kind, Command::Read | Command::Write) && req.length > MAX_PAYLOAD {
        return Err(NBD_EINVAL);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= size);
    if !in_range {
        return Err(if is_write { NBD_ENOSPC } else { NBD_EINVAL });
    }
    Ok(())
}

async fn read_payload<R>(rd: &mut R, len: usize) -> io::Result<Bytes>
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        let n = (&mut *rd).take(want).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

async fn reader_loop<R>(
    rd: &mut R,
    export: &Arc<dyn Export>,
    tx: &mpsc::UnboundedSender<Reply>,
    shared: &Arc<Shared>,
) -> End
where
    R: AsyncRead + Unpin,
{
    let size = export.size();
    let read_only = export.read_only();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes_budget = Arc::new(Semaphore::new(MAX_BUFFERED_BYTES));

    loop {
        if shared.stop.load(Ordering::Acquire) {
            return End::Clean;
        }
        // Bound in-flight requests before reading the next one.
        let slot = tokio::select! {
            biased;
            _ = shared.notify.notified() => return End::Clean,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return End::Clean, // never closed
            },
        };
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = shared.notify.notified() => return End::Clean,
            r = rd.read_exact(&mut hdr) => r,
        };
        if let Err(e) = read {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                // Client hard-disconnected (or half-closed) at a request boundary.
                End::Clean
            } else {
                End::Error(e.into())
            };
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => return End::Error(e.into()),
        };
        let cookie = req.cookie;

        if req.kind == Command::Disc {
            return End::Clean;
        }

        // Payload-carrying / payload-producing requests take byte budget.
        let payload_len = match req.kind {
            Command::Write | Command::Read if req.length <= MAX_PAYLOAD => req.length,
            _ => 0,
        };
        let bytes = if payload_len > 0 {
            // MAX_PAYLOAD < MAX_BUFFERED_BYTES, so this always succeeds eventually.
            match Arc::clone(&bytes_budget)
                .acquire_many_owned(payload_len)
                .await
            {
                Ok(p) => Some(p),
                Err(_) => return End::Clean,
            }
        } else {
            None
        };
        let permits = Permits {
            _slot: slot,
            _bytes: bytes,
        };

        let mut data = None;
        if req.kind == Command::Write {
            if req.length > MAX_PAYLOAD {
                return End::Error(NbdError::PayloadTooLarge(req.length));
            }
            match read_payload(rd, req.length as usize).await {
                Ok(d) => data = Some(d),
                Err(e) => return End::Error(e.into()),
            }
        }

        if let Err(errno) = validate(&req, size, read_only) {
            tracing::debug!(?req, errno, "nbd: rejecting request");
            let _ = tx.send(Reply {
                cookie,
                error: errno,
                data: None,
                _permits: Some(permits),
            });
            continue;
        }
        if req.length == 0 && req.kind != Command::Flush {
            let _ = tx.send(Reply {
                cookie,
                error: 0,
                data: None,
                _permits: Some(permits),
            });
            continue;
        }

        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        let (off, len) = (req.offset, req.length);
        let tx = tx.clone();
        let shared = Arc::clone(shared);
        match req.kind {
            Command::Read => {
                let fut = export.read(off, len);
                tokio::spawn(async move {
                    let (error, data) = match fut.await {
                        Ok(d) if d.len() == len as usize => (0, Some(d)),
                        Ok(d) => {
                            tracing::error!(
                                offset = off,
                                len,
                                got = d.len(),
                                "nbd: export returned short read"
                            );
                            (NBD_EIO, None)
                        }
                        Err(e) => (errno_for(&e), None),
                    };
                    if error == NBD_ESHUTDOWN {
                        shared.stop();
                    }
                    let _ = tx.send(Reply {
                        cookie,
                        error,
                        data,
                        _permits: Some(permits),
                    });
                });
            }
            kind => {
                let fut = match kind {
                    Command::Write => export.write(off, data.unwrap_or_default(), fua),
                    Command::Flush => export.flush(),
                    Command::Trim => export.trim(off, len, fua),
                    _ => export.write_zeroes(off, len, fua),
                };
                tokio::spawn(async move {
                    let error = match fut.await {
                        Ok(()) => 0,
                        Err(e) => errno_for(&e),
                    };
                    if error == NBD_ESHUTDOWN {
                        shared.stop();
                    }
                    let _ = tx.send(Reply {
                        cookie,
                        error,
                        data: None,
                        _permits: Some(permits),
                    });
                });
            }
        }
    }
}

/// Batching reply writer.
struct ReplyWriter<W> {
    w: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    async fn push(&mut self, r: Reply) -> io::Result<()> {
        self.buf
            .extend_from_slice(&encode_simple_reply(r.error, r.cookie));
        if let Some(d) = r.data.as_deref() {
            if d.len() <= INLINE_DATA_MAX {
                self.buf.extend_from_slice(d);
            } else {
                write_two(&mut self.w, &self.buf, d).await?;
                self.buf.clear();
            }
        }
        if self.buf.len() >= WRITE_BUF_CAP {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.w.flush().await
    }
}

/// Write `a` then `b` completely, using vectored writes where supported.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            let m = (n - a.len()).min(b.len());
            a = &[];
            b = &b[m..];
        }
    }
    Ok(())
}

async fn writer_task<W>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    shared: Arc<Shared>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = ReplyWriter {
        w: wr,
        buf: Vec::with_capacity(WRITE_BUF_CAP + INLINE_DATA_MAX + 64),
    };
    let res = async {
        while let Some(r) = rx.recv().await {
            w.push(r).await?;
            while let Ok(r) = rx.try_recv() {
                w.push(r).await?;
            }
            w.flush().await?;
        }
        w.w.shutdown().await
    }
    .await;
    if res.is_err() {
        // The client is gone: stop reading requests.
        shared.stop();
    }
    res
}
