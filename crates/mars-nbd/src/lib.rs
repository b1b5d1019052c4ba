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
//! (ACK, then close), `STARTTLS` (see TLS below). Everything else
//! (`STRUCTURED_REPLY`, meta contexts, extended headers, ...) gets `ERR_UNSUP`:
//! only simple replies are used.
//! Malformed payloads get `ERR_INVALID`; payloads over 64 KiB get `ERR_TOO_BIG` and
//! the connection is closed without reading them. The handshake must complete
//! within [`HANDSHAKE_TIMEOUT`]. The empty export name is not
//! special: it is looked up in the [`Registry`] like any other name.
//!
//! # TLS and who may connect
//! [`ServerOptions::tls`] ([`Tls`]): `Off` answers `NBD_OPT_STARTTLS` with
//! `ERR_POLICY` (NOTLS); `Optional` answers it with `ACK`, runs the TLS
//! handshake (rustls) and starts the option haggling again inside TLS, as the
//! spec requires (no state is kept; the greeting and client flags are not
//! repeated); a client that never asks stays in plaintext; `Required` is the
//! spec's FORCEDTLS: before TLS, every option other than `STARTTLS` and `ABORT`
//! gets `ERR_TLS_REQD`, and `EXPORT_NAME` (which cannot fail) closes the
//! connection. Inside TLS a second `STARTTLS` gets `ERR_INVALID`, and
//! `ERR_TLS_REQD` is never sent. `STARTTLS` with a payload gets `ERR_INVALID`;
//! bytes the client sent behind `STARTTLS` before the `ACK` close the
//! connection. A failed TLS handshake (e.g. a client certificate the
//! configured client CA did not issue) closes the connection. The TLS
//! handshake counts against [`HANDSHAKE_TIMEOUT`].
//!
//! [`ServerOptions::allow`] ([`AllowList`]): connections from other addresses
//! are closed at accept, before anything is sent, with a log line (at most one
//! a second, counting the others).
//!
//! Transmission after TLS is the same code as in plaintext, generic over the
//! stream (the TLS stream is split with `tokio::io::split`; plain TCP with
//! `into_split`).
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

pub mod allow;
pub mod proto;
pub mod stats;
pub mod tls;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use proto::*;

pub use allow::AllowList;
pub use proto::{Command, ProtoError, Request};
pub use stats::DeviceStats;
pub use tls::{Tls, TlsAcceptor};

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
    /// Called before a connection starts the requests it read in one go, and
    /// `end_batch` after them, on the same thread with nothing awaited between: an
    /// export may collect the writes started between the two and do them together
    /// (their futures are polled once when started, then again when woken).
    fn begin_batch(&self) {}
    fn end_batch(&self) {}
    /// Where the connections serving this export count their requests
    /// (`None`: not counted, no clock read per request).
    fn stats(&self) -> Option<Arc<DeviceStats>> {
        None
    }
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
    #[error("NBD_OPT_EXPORT_NAME before TLS, and this server requires TLS")]
    TlsRequired,
    #[error("TLS: {0}")]
    Tls(String),
}

/// What a server offers and to whom (the default: plaintext, everyone).
#[derive(Clone, Default)]
pub struct ServerOptions {
    pub tls: Tls,
    /// None: every address may connect.
    pub allow: Option<AllowList>,
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
/// connection. Plaintext, every address: [`serve_with`] for TLS and an
/// allow-list.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<dyn Registry>,
) -> io::Result<()> {
    serve_with(listener, registry, ServerOptions::default()).await
}

/// [`serve`] with TLS and an allow-list of client addresses.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    registry: Arc<dyn Registry>,
    options: ServerOptions,
) -> io::Result<()> {
    let tls = Arc::new(options.tls);
    let mut refusals = RefusalLog::default();
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
        if let Some(allow) = &options.allow {
            if !allow.allows(peer.ip()) {
                drop(stream);
                refusals.note(peer);
                continue;
            }
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "nbd: cannot set TCP_NODELAY");
        }
        let registry = Arc::clone(&registry);
        let tls = Arc::clone(&tls);
        tokio::spawn(async move {
            tracing::debug!(%peer, "nbd: connection accepted");
            match serve_tcp(stream, registry, &tls).await {
                Ok(()) => tracing::debug!(%peer, "nbd: connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "nbd: connection ended with error"),
            }
        });
    }
}

/// Logs connections refused by the allow-list: the first of each second with
/// its address, and how many more there were, so that a flood does not flood
/// the log.
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: std::net::SocketAddr) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        self.last = Some(now);
        let more = std::mem::take(&mut self.unlogged);
        if more > 0 {
            tracing::warn!(%peer, "nbd: connection refused: address not on the allow-list (nbd_allow); {more} more refused since the last such line");
        } else {
            tracing::warn!(%peer, "nbd: connection refused: address not on the allow-list (nbd_allow)");
        }
    }
}

/// Serve one already-accepted connection (handshake + transmission), plaintext.
pub async fn serve_connection<S>(stream: S, registry: Arc<dyn Registry>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_with(stream, registry, &Tls::Off).await
}

/// [`serve_connection`] with TLS as `tls` says.
pub async fn serve_connection_with<S>(
    stream: S,
    registry: Arc<dyn Registry>,
    tls: &Tls,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match negotiate_with_timeout(stream, &*registry, tls).await? {
        Negotiated::Closed => Ok(()),
        Negotiated::Plain(conn, name, export) => {
            tracing::debug!(export = %name, "nbd: entering transmission");
            // Requests the client pipelined behind the handshake may already be buffered.
            let leftover = BytesMut::from(conn.buffer());
            let (rd, wr) = tokio::io::split(conn.into_inner());
            transmission(leftover, rd, wr, export).await
        }
        Negotiated::Tls(conn, name, export) => tls_transmission(*conn, name, export).await,
    }
}

/// [`serve_connection`] for TCP: after a plaintext handshake the socket is split
/// with `into_split` (no lock shared between the reader and the writer).
async fn serve_tcp(
    stream: TcpStream,
    registry: Arc<dyn Registry>,
    tls: &Tls,
) -> Result<(), NbdError> {
    match negotiate_with_timeout(stream, &*registry, tls).await? {
        Negotiated::Closed => Ok(()),
        Negotiated::Plain(conn, name, export) => {
            tracing::debug!(export = %name, "nbd: entering transmission");
            // Requests the client pipelined behind NBD_OPT_GO may already be buffered.
            let leftover = BytesMut::from(conn.buffer());
            let (r, w) = conn.into_inner().into_split();
            transmission(leftover, r, w, export).await
        }
        Negotiated::Tls(conn, name, export) => tls_transmission(*conn, name, export).await,
    }
}

/// Transmission inside TLS: the same loop as in plaintext, over the TLS
/// stream's halves.
async fn tls_transmission<S>(
    conn: BufReader<TlsStream<S>>,
    name: String,
    export: Arc<dyn Export>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(export = %name, "nbd: entering transmission (TLS)");
    let leftover = BytesMut::from(conn.buffer());
    let (rd, wr) = tokio::io::split(conn.into_inner());
    transmission(leftover, rd, wr, export).await
}

// ======================================================================= handshake

/// The connection after the handshake: the export chosen in plaintext or
/// inside TLS, or nothing (the client aborted or went away).
enum Negotiated<S> {
    Closed,
    Plain(BufReader<S>, String, Arc<dyn Export>),
    Tls(Box<BufReader<TlsStream<S>>>, String, Arc<dyn Export>),
}

async fn negotiate_with_timeout<S>(
    stream: S,
    registry: &dyn Registry,
    tls: &Tls,
) -> Result<Negotiated<S>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(stream, registry, tls)).await {
        Ok(r) => r,
        Err(_) => Err(NbdError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake timed out",
        ))),
    }
}

/// Where the connection stands with TLS while options are haggled.
#[derive(Clone, Copy)]
enum TlsState<'a> {
    /// Not offered: STARTTLS gets ERR_POLICY.
    Off,
    /// Offered; the client may go on in plaintext.
    Offered(&'a TlsAcceptor),
    /// Required and not yet started (FORCEDTLS).
    Forced(&'a TlsAcceptor),
    /// Inside TLS.
    Active,
}

/// How one round of option haggling ended.
enum Haggled<'a> {
    Closed,
    Export(String, Arc<dyn Export>),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls(&'a TlsAcceptor),
}

async fn negotiate<S>(
    stream: S,
    registry: &dyn Registry,
    tls: &Tls,
) -> Result<Negotiated<S>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = BufReader::with_capacity(READ_BUF_CAP, stream);
    let no_zeroes = greet(&mut conn).await?;
    let state = match tls {
        Tls::Off => TlsState::Off,
        Tls::Optional(a) => TlsState::Offered(a),
        Tls::Required(a) => TlsState::Forced(a),
    };
    let acceptor = match haggle(&mut conn, registry, state, no_zeroes).await? {
        Haggled::Closed => return Ok(Negotiated::Closed),
        Haggled::Export(name, export) => return Ok(Negotiated::Plain(conn, name, export)),
        Haggled::StartTls(acceptor) => acceptor,
    };
    // A client waits for the ACK before it starts TLS: anything already buffered
    // was sent blind and would be taken for TLS records.
    if !conn.buffer().is_empty() {
        return Err(NbdError::Tls(
            "client sent data behind NBD_OPT_STARTTLS before the reply".into(),
        ));
    }
    let stream = acceptor
        .accept(conn.into_inner())
        .await
        .map_err(|e| NbdError::Tls(format!("handshake failed: {e}")))?;
    tracing::debug!(
        version = ?stream.get_ref().1.protocol_version(),
        "nbd: TLS established"
    );
    let mut conn = BufReader::with_capacity(READ_BUF_CAP, stream);
    match haggle(&mut conn, registry, TlsState::Active, no_zeroes).await? {
        Haggled::Closed => Ok(Negotiated::Closed),
        Haggled::Export(name, export) => Ok(Negotiated::Tls(Box::new(conn), name, export)),
        // haggle never acknowledges STARTTLS inside TLS.
        Haggled::StartTls(_) => Err(NbdError::Tls("STARTTLS inside TLS".into())),
    }
}

/// Send the greeting and read the client's flags: whether it set NO_ZEROES.
async fn greet<S>(conn: &mut BufReader<S>) -> Result<bool, NbdError>
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
    Ok(client_flags & NBD_FLAG_C_NO_ZEROES != 0)
}

/// Option haggling until the client chooses an export, aborts, goes away, or
/// (outside TLS, when offered) starts TLS.
async fn haggle<'a, S>(
    conn: &mut BufReader<S>,
    registry: &dyn Registry,
    tls: TlsState<'a>,
    no_zeroes: bool,
) -> Result<Haggled<'a>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match conn.read_exact(&mut hdr).await {
            Ok(_) => {}
            // Client hung up between options: not an error worth reporting.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Haggled::Closed),
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

        if option == NBD_OPT_STARTTLS {
            match tls {
                TlsState::Off => put_option_reply(
                    &mut out,
                    option,
                    NBD_REP_ERR_POLICY,
                    b"TLS is not enabled on this server",
                ),
                TlsState::Active => put_option_reply(
                    &mut out,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"TLS is already active",
                ),
                TlsState::Offered(_) | TlsState::Forced(_) if !payload.is_empty() => {
                    put_option_reply(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    )
                }
                TlsState::Offered(acceptor) | TlsState::Forced(acceptor) => {
                    put_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                    conn.write_all(&out).await?;
                    conn.flush().await?;
                    return Ok(Haggled::StartTls(acceptor));
                }
            }
            conn.write_all(&out).await?;
            conn.flush().await?;
            continue;
        }
        if matches!(tls, TlsState::Forced(_)) && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                // It cannot be answered with an error.
                return Err(NbdError::TlsRequired);
            }
            put_option_reply(
                &mut out,
                option,
                NBD_REP_ERR_TLS_REQD,
                b"this server requires TLS (NBD_OPT_STARTTLS)",
            );
            conn.write_all(&out).await?;
            conn.flush().await?;
            continue;
        }

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
                return Ok(Haggled::Export(name, export));
            }
            NBD_OPT_ABORT => {
                // Any payload is ignored, as the spec recommends.
                put_option_reply(&mut out, option, NBD_REP_ACK, &[]);
                // The client may already have closed: ignore errors.
                let _ = conn.write_all(&out).await;
                let _ = conn.flush().await;
                let _ = conn.shutdown().await;
                return Ok(Haggled::Closed);
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
                            return Ok(Haggled::Export(req.name, export));
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

/// Bytes read from the socket at a time (at least).
const READ_CHUNK: usize = 128 * 1024;
/// WRITE payloads up to this size are copied out of the receive buffer into their
/// own allocation (so that a small write kept in the log's memory does not pin a
/// whole receive chunk); larger ones are split off without a copy.
const COPY_PAYLOAD_MAX: usize = 64 * 1024;
/// Stop reading requests while this many reply bytes (headers and inlined data)
/// wait for the client to read them.
const OUT_META_MAX: usize = 1024 * 1024;
/// Events handled in one poll of a connection before it yields to other tasks.
const ROUNDS_PER_POLL: usize = 16;
/// Buffers handed to one vectored write.
const MAX_IOV: usize = 64;

/// Completions signalled by request futures, collected for the connection task.
struct ReadyQueue {
    ready: Mutex<Vec<usize>>,
    task: Mutex<Option<Waker>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The waker given to the future in one slot: queues the slot and wakes the connection task.
struct SlotWaker {
    idx: usize,
    queued: AtomicBool,
    queue: Arc<ReadyQueue>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.queue.ready).push(self.idx);
            let task = lock(&self.queue.task).take();
            if let Some(w) = task {
                w.wake();
            }
        }
    }
}

enum Work {
    Read(BoxFut<io::Result<Bytes>>, u32),
    Other(BoxFut<io::Result<()>>),
}

struct InFlight {
    cookie: u64,
    work: Work,
    /// Payload bytes this request holds in the connection's budget.
    budget: usize,
    /// When it was handed to the export (only when the export counts requests).
    started: Option<Instant>,
    /// Its command (`stats::COMMANDS` index) and length, for the statistics.
    cmd: u8,
    len: u32,
}

struct Slot {
    waker: Arc<SlotWaker>,
    std_waker: Waker,
    req: Option<InFlight>,
}

/// The requests of one connection that are running in the export: polled by the
/// connection task itself (no task per request); completions are found through
/// per-slot wakers, so that only finished futures are polled again.
struct Requests {
    slots: Vec<Slot>,
    free: Vec<usize>,
    queue: Arc<ReadyQueue>,
    running: usize,
    /// Scratch for the ready list, swapped with the queue's.
    scratch: Vec<usize>,
}

enum Done {
    Read(io::Result<Bytes>, u32),
    Other(io::Result<()>),
}

impl Requests {
    fn new() -> Self {
        Requests {
            slots: Vec::new(),
            free: Vec::new(),
            queue: Arc::new(ReadyQueue {
                ready: Mutex::new(Vec::new()),
                task: Mutex::new(None),
            }),
            running: 0,
            scratch: Vec::new(),
        }
    }

    /// Start `r`: poll it once; the result when it is done already.
    fn start(&mut self, r: InFlight) -> Option<(InFlight, Done)> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let waker = Arc::new(SlotWaker {
                    idx: self.slots.len(),
                    queued: AtomicBool::new(false),
                    queue: Arc::clone(&self.queue),
                });
                self.slots.push(Slot {
                    std_waker: Waker::from(Arc::clone(&waker)),
                    waker,
                    req: None,
                });
                self.slots.len() - 1
            }
        };
        self.slots[idx].req = Some(r);
        self.running += 1;
        self.poll_slot(idx)
    }

    fn poll_slot(&mut self, idx: usize) -> Option<(InFlight, Done)> {
        let slot = &mut self.slots[idx];
        let req = slot.req.as_mut()?;
        let mut cx = Context::from_waker(&slot.std_waker);
        let done = match &mut req.work {
            Work::Read(f, len) => match f.as_mut().poll(&mut cx) {
                Poll::Ready(r) => Done::Read(r, *len),
                Poll::Pending => return None,
            },
            Work::Other(f) => match f.as_mut().poll(&mut cx) {
                Poll::Ready(r) => Done::Other(r),
                Poll::Pending => return None,
            },
        };
        let req = slot.req.take()?;
        self.free.push(idx);
        self.running -= 1;
        Some((req, done))
    }

    /// Completions from now on only queue their slots, until `poll_ready` registers
    /// the task's waker again (and then finds them queued).
    fn suspend_task_wakeup(&self) {
        lock(&self.queue.task).take();
    }

    /// Poll the requests whose futures were woken; call `f` for each finished one.
    /// Registers the task's waker first, so that no completion is missed.
    fn poll_ready(&mut self, cx: &Context<'_>, mut f: impl FnMut(InFlight, Done)) -> bool {
        if self.running == 0 {
            return false;
        }
        {
            let mut task = lock(&self.queue.task);
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut ready = std::mem::take(&mut self.scratch);
        std::mem::swap(&mut *lock(&self.queue.ready), &mut ready);
        let mut any = false;
        for &idx in &ready {
            if let Some(slot) = self.slots.get(idx) {
                slot.waker.queued.store(false, Ordering::Release);
                if let Some((req, done)) = self.poll_slot(idx) {
                    f(req, done);
                    any = true;
                }
            }
        }
        ready.clear();
        self.scratch = ready;
        any
    }
}

/// One piece of reply bytes, and what it gives back once completely written.
struct Seg {
    bytes: Bytes,
    /// Payload budget held until then.
    budget: usize,
    /// Reply header bytes in it (counted against `OUT_META_MAX`).
    meta: usize,
}

/// Reply bytes waiting to be written: `small` collects headers and small payloads
/// and is sealed into a segment before writing; large read payloads are segments
/// of their own (no copy).
struct Output {
    segs: VecDeque<Seg>,
    small: BytesMut,
    small_budget: usize,
    small_meta: usize,
    /// Reply header bytes not yet written.
    meta: usize,
}

impl Output {
    fn is_empty(&self) -> bool {
        self.segs.is_empty() && self.small.is_empty()
    }

    fn push(&mut self, cookie: u64, error: u32, data: Option<Bytes>, budget: usize) {
        self.small
            .extend_from_slice(&encode_simple_reply(error, cookie));
        self.small_meta += SIMPLE_REPLY_LEN;
        self.meta += SIMPLE_REPLY_LEN;
        match data {
            Some(d) if d.len() > INLINE_DATA_MAX => {
                self.seal();
                self.segs.push_back(Seg {
                    bytes: d,
                    budget,
                    meta: 0,
                });
            }
            Some(d) => {
                self.small.extend_from_slice(&d);
                self.small_budget += budget;
            }
            None => self.small_budget += budget,
        }
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(Seg {
                bytes: self.small.split().freeze(),
                budget: std::mem::take(&mut self.small_budget),
                meta: std::mem::take(&mut self.small_meta),
            });
        }
    }
}

enum End {
    /// DISC, EOF at a request boundary, or the export went away.
    Clean,
    /// Protocol violation: close after in-flight requests.
    Error(NbdError),
}

struct Conn<R, W> {
    rd: R,
    wr: W,
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    inbuf: BytesMut,
    /// A request whose header is parsed, waiting for budget (and its WRITE payload).
    pending: Option<Request>,
    requests: Requests,
    out: Output,
    /// Read/write payload bytes held by requests and unwritten replies.
    budget_used: usize,
    /// No more requests are read; set with the reason.
    end: Option<End>,
    /// The writer needs a flush before the output counts as delivered.
    need_flush: bool,
    /// Scratch for completions found in one round.
    finished: Vec<(InFlight, Done)>,
    /// The export's request statistics, if it keeps them.
    stats: Option<Arc<DeviceStats>>,
}

impl<R, W> Drop for Conn<R, W> {
    fn drop(&mut self) {
        // Requests still running in the export are no longer this
        // connection's: they leave the in-flight count with it.
        if let Some(s) = &self.stats {
            s.abandoned(self.requests.running);
        }
    }
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fn finish(&mut self, req: InFlight, done: Done) {
        let (error, data) = match done {
            Done::Read(Ok(d), len) if d.len() == len as usize => (0, Some(d)),
            Done::Read(Ok(d), len) => {
                tracing::error!(
                    len,
                    got = d.len(),
                    cookie = req.cookie,
                    "nbd: export returned short read"
                );
                (NBD_EIO, None)
            }
            Done::Read(Err(e), _) | Done::Other(Err(e)) => (errno_for(&e), None),
            Done::Other(Ok(())) => (0, None),
        };
        if let (Some(s), Some(t)) = (&self.stats, req.started) {
            s.finished(usize::from(req.cmd), req.len, t.elapsed(), error != 0, true);
        }
        if error == NBD_ESHUTDOWN && self.end.is_none() {
            // The export is gone: answer what is in flight, read nothing more.
            self.end = Some(End::Clean);
        }
        self.out.push(req.cookie, error, data, req.budget);
    }

    fn can_take_request(&self) -> bool {
        self.end.is_none() && self.requests.running < MAX_IN_FLIGHT && self.out.meta < OUT_META_MAX
    }

    /// Read more bytes into `inbuf` (at least `want` bytes of room).
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let room = want.max(READ_CHUNK);
        if self.inbuf.capacity() - self.inbuf.len() < room.min(want.max(REQUEST_LEN)) {
            self.inbuf.reserve(room);
        }
        let spare = self.inbuf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        let ptr = rb.filled().as_ptr();
        ready!(Pin::new(&mut self.rd).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n > 0 && rb.filled().as_ptr() != ptr {
            return Poll::Ready(Err(io::Error::other("reader swapped the read buffer")));
        }
        // SAFETY: poll_read initialized the first `n` bytes of the spare capacity
        // (checked above to be the buffer we handed it).
        unsafe { self.inbuf.set_len(self.inbuf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Parse and start requests while allowed and available. Returns whether
    /// anything happened.
    fn poll_requests(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.can_take_request() {
            let req = match self.pending.take() {
                Some(r) => r,
                None => {
                    if self.inbuf.len() < REQUEST_LEN {
                        match self.poll_fill(cx, REQUEST_LEN - self.inbuf.len()) {
                            Poll::Pending => return progress,
                            Poll::Ready(Ok(0)) => {
                                // Client hard-disconnected (or half-closed).
                                self.end = Some(End::Clean);
                                return true;
                            }
                            Poll::Ready(Ok(_)) => {
                                progress = true;
                                continue;
                            }
                            Poll::Ready(Err(e)) => {
                                self.end = Some(End::Error(e.into()));
                                return true;
                            }
                        }
                    }
                    progress = true;
                    let req = match parse_request(&self.inbuf[..REQUEST_LEN]) {
                        Ok(r) => r,
                        Err(e) => {
                            self.end = Some(End::Error(e.into()));
                            return true;
                        }
                    };
                    self.inbuf.advance(REQUEST_LEN);
                    if req.kind == Command::Disc {
                        self.end = Some(End::Clean);
                        return true;
                    }
                    if req.kind == Command::Write && req.length > MAX_PAYLOAD {
                        self.end = Some(End::Error(NbdError::PayloadTooLarge(req.length)));
                        return true;
                    }
                    req
                }
            };
            let payload_len = match req.kind {
                Command::Write | Command::Read if req.length <= MAX_PAYLOAD => req.length as usize,
                _ => 0,
            };
            // Payload budget (MAX_PAYLOAD < MAX_BUFFERED_BYTES: an idle connection always admits).
            if payload_len > 0 && self.budget_used + payload_len > MAX_BUFFERED_BYTES {
                self.pending = Some(req);
                return progress;
            }
            let mut data = None;
            if req.kind == Command::Write {
                if self.inbuf.len() < payload_len {
                    let missing = payload_len - self.inbuf.len();
                    match self.poll_fill(cx, missing) {
                        Poll::Pending => {
                            self.pending = Some(req);
                            return progress;
                        }
                        Poll::Ready(Ok(0)) => {
                            self.end = Some(End::Error(NbdError::Io(
                                io::ErrorKind::UnexpectedEof.into(),
                            )));
                            return true;
                        }
                        Poll::Ready(Ok(_)) => {
                            self.pending = Some(req);
                            progress = true;
                            continue;
                        }
                        Poll::Ready(Err(e)) => {
                            self.end = Some(End::Error(e.into()));
                            return true;
                        }
                    }
                }
                data = Some(if payload_len <= COPY_PAYLOAD_MAX {
                    let d = Bytes::copy_from_slice(&self.inbuf[..payload_len]);
                    self.inbuf.advance(payload_len);
                    d
                } else {
                    self.inbuf.split_to(payload_len).freeze()
                });
            }
            progress = true;
            self.start_request(req, payload_len, data);
        }
        progress
    }

    fn start_request(&mut self, req: Request, payload_len: usize, data: Option<Bytes>) {
        let cookie = req.cookie;
        let cmd = stats::command_index(req.kind);
        if let Err(errno) = validate(&req, self.size, self.read_only) {
            tracing::debug!(?req, errno, "nbd: rejecting request");
            if let Some(s) = &self.stats {
                s.finished(cmd, 0, Duration::ZERO, true, false);
            }
            self.out.push(cookie, errno, None, 0);
            return;
        }
        if req.length == 0 && req.kind != Command::Flush {
            if let Some(s) = &self.stats {
                s.finished(cmd, 0, Duration::ZERO, false, false);
            }
            self.out.push(cookie, 0, None, 0);
            return;
        }
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        let (off, len) = (req.offset, req.length);
        // Before the export is called: a read it answers inline runs in the call.
        let started = self.stats.as_ref().map(|s| {
            s.started();
            Instant::now()
        });
        let work = match req.kind {
            Command::Read => Work::Read(self.export.read(off, len), len),
            Command::Write => Work::Other(self.export.write(off, data.unwrap_or_default(), fua)),
            Command::Flush => Work::Other(self.export.flush()),
            Command::Trim => Work::Other(self.export.trim(off, len, fua)),
            _ => Work::Other(self.export.write_zeroes(off, len, fua)),
        };
        self.budget_used += payload_len;
        let r = InFlight {
            cookie,
            work,
            budget: payload_len,
            started,
            // `COMMANDS` has 6 entries.
            cmd: cmd as u8,
            len,
        };
        if let Some((r, done)) = self.requests.start(r) {
            self.finish(r, done);
        }
    }

    /// Write queued replies. Ready(Ok(progress)) once everything is written (and flushed).
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut progress = false;
        loop {
            self.out.seal();
            if self.out.segs.is_empty() {
                if self.need_flush {
                    ready!(Pin::new(&mut self.wr).poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Ready(Ok(progress));
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for seg in self.out.segs.iter().take(MAX_IOV) {
                iov[n_iov] = IoSlice::new(&seg.bytes);
                n_iov += 1;
            }
            let n = ready!(Pin::new(&mut self.wr).poll_write_vectored(cx, &iov[..n_iov]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            progress = true;
            self.need_flush = true;
            let mut left = n;
            while let Some(front) = self.out.segs.front_mut() {
                if left < front.bytes.len() {
                    front.bytes.advance(left);
                    break;
                }
                left -= front.bytes.len();
                self.out.meta -= front.meta;
                self.budget_used -= front.budget;
                self.out.segs.pop_front();
            }
        }
    }

    /// Drive the connection until no more requests will be read and every reply is written.
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for _ in 0..ROUNDS_PER_POLL {
            let mut progress = false;
            // Completions, then new requests (whose immediate results join the same
            // write), then one write for all of it.
            let mut finished = std::mem::take(&mut self.finished);
            progress |= self.requests.poll_ready(cx, |r, d| finished.push((r, d)));
            for (r, d) in finished.drain(..) {
                self.finish(r, d);
            }
            // New requests as one batch for the export. Requests it completes at
            // `end_batch` wake their slots: without the task's waker registered (taken
            // here, registered again by the next `poll_ready`), that does not schedule
            // this task again for what the next lines collect anyway.
            self.requests.suspend_task_wakeup();
            self.export.begin_batch();
            progress |= self.poll_requests(cx);
            self.export.end_batch();
            progress |= self.requests.poll_ready(cx, |r, d| finished.push((r, d)));
            for (r, d) in finished.drain(..) {
                self.finish(r, d);
            }
            self.finished = finished;
            match self.poll_output(cx) {
                Poll::Ready(Ok(p)) => {
                    progress |= p;
                    if self.end.is_some() && self.requests.running == 0 && self.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Plenty to do: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

async fn transmission<R, W>(
    inbuf: BytesMut,
    rd: R,
    wr: W,
    export: Arc<dyn Export>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stats = export.stats();
    // Counts this connection for as long as it runs.
    let _counted = stats.clone().map(stats::ConnectionGuard::new);
    let mut conn = Conn {
        stats,
        rd,
        size: export.size(),
        read_only: export.read_only(),
        export,
        wr,
        inbuf,
        pending: None,
        requests: Requests::new(),
        out: Output {
            segs: VecDeque::new(),
            small: BytesMut::with_capacity(WRITE_BUF_CAP),
            small_budget: 0,
            small_meta: 0,
            meta: 0,
        },
        budget_used: 0,
        end: None,
        need_flush: false,
        finished: Vec::new(),
    };
    // A write error means the client is gone: requests still running are dropped
    // (what they do in the export carries on; only their replies are lost).
    std::future::poll_fn(|cx| conn.poll_conn(cx)).await?;
    match conn.end.take() {
        Some(End::Error(e)) => {
            let _ = conn.wr.shutdown().await;
            Err(e)
        }
        _ => conn.wr.shutdown().await.map_err(NbdError::Io),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::DuplexStream;
    use tokio::sync::oneshot;

    /// An export whose writes finish only when the test lets them, from another thread.
    struct GatedExport {
        data: Mutex<Vec<u8>>,
        gate: Mutex<Vec<oneshot::Sender<()>>>,
        started: AtomicUsize,
    }

    impl Export for GatedExport {
        fn size(&self) -> u64 {
            lock(&self.data).len() as u64
        }
        fn read(&self, offset: u64, len: u32) -> BoxFut<io::Result<Bytes>> {
            let d = lock(&self.data)[offset as usize..offset as usize + len as usize].to_vec();
            Box::pin(async move { Ok(Bytes::from(d)) })
        }
        fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFut<io::Result<()>> {
            lock(&self.data)[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            let (tx, rx) = oneshot::channel();
            lock(&self.gate).push(tx);
            self.started.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { rx.await.map_err(|_| io::Error::other("gate dropped")) })
        }
        fn flush(&self) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, _: u64, _: u32, _: bool) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u32, _: bool) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn req(kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
        encode_request(&Request {
            flags: 0,
            kind: Command::from_u16(kind),
            cookie,
            offset,
            length,
        })
    }

    async fn read_reply(s: &mut tokio::io::ReadHalf<DuplexStream>) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        s.read_exact(&mut h).await.unwrap();
        parse_simple_reply(&h).unwrap()
    }

    /// Requests finish from a foreign thread (as with the logger); the connection never
    /// has more than MAX_IN_FLIGHT running, and every one is answered once released.
    #[tokio::test]
    async fn in_flight_bounded_and_woken_from_other_threads() {
        let export = Arc::new(GatedExport {
            data: Mutex::new(vec![0u8; 1 << 20]),
            gate: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
        });
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (sr, sw) = tokio::io::split(server);
        let server = tokio::spawn(transmission(BytesMut::new(), sr, sw, export.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let n = 300u64;
        let sender = tokio::spawn(async move {
            for c in 0..n {
                cw.write_all(&req(NBD_CMD_WRITE, c, c * 512, 512))
                    .await
                    .unwrap();
                cw.write_all(&[c as u8; 512]).await.unwrap();
            }
            cw.write_all(&req(NBD_CMD_DISC, 0, 0, 0)).await.unwrap();
            cw
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while export.started.load(Ordering::SeqCst) < MAX_IN_FLIGHT {
            assert!(std::time::Instant::now() < deadline, "requests not started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // An observation window, not a synchronisation: no request beyond the bound
        // may start during it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(export.started.load(Ordering::SeqCst), MAX_IN_FLIGHT);
        // Release them from a plain thread, a few at a time, until all are done.
        let releaser = {
            let export = export.clone();
            std::thread::spawn(move || {
                let mut released = 0;
                while released < n as usize {
                    let batch: Vec<_> = lock(&export.gate).drain(..).collect();
                    released += batch.len();
                    for tx in batch {
                        let _ = tx.send(());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let (err, cookie) = read_reply(&mut cr).await;
            assert_eq!(err, 0);
            assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        }
        releaser.join().unwrap();
        let _cw = sender.await.unwrap();
        server.await.unwrap().unwrap();
        let data = lock(&export.data).clone();
        for c in 0..n as usize {
            assert!(data[c * 512..(c + 1) * 512].iter().all(|&b| b == c as u8));
        }
    }

    /// The same, counting its requests.
    struct CountedExport(GatedExport, Arc<DeviceStats>);

    impl Export for CountedExport {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read(&self, offset: u64, len: u32) -> BoxFut<io::Result<Bytes>> {
            self.0.read(offset, len)
        }
        fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFut<io::Result<()>> {
            self.0.write(offset, data, fua)
        }
        fn flush(&self) -> BoxFut<io::Result<()>> {
            self.0.flush()
        }
        fn trim(&self, o: u64, l: u32, f: bool) -> BoxFut<io::Result<()>> {
            self.0.trim(o, l, f)
        }
        fn write_zeroes(&self, o: u64, l: u32, f: bool) -> BoxFut<io::Result<()>> {
            self.0.write_zeroes(o, l, f)
        }
        fn stats(&self) -> Option<Arc<DeviceStats>> {
            Some(self.1.clone())
        }
    }

    /// Requests are counted by command when answered (refused ones as errors),
    /// in flight while the export runs them, and a connection that goes away
    /// with requests running takes them out of the in-flight count.
    #[tokio::test]
    async fn requests_are_counted_by_command_and_in_flight_until_answered() {
        let stats = Arc::new(DeviceStats::new());
        let export = Arc::new(CountedExport(
            GatedExport {
                data: Mutex::new(vec![0u8; 1 << 20]),
                gate: Mutex::new(Vec::new()),
                started: AtomicUsize::new(0),
            },
            stats.clone(),
        ));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (sr, sw) = tokio::io::split(server);
        let server = tokio::spawn(transmission(BytesMut::new(), sr, sw, export.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        for c in 0..3u64 {
            cw.write_all(&req(NBD_CMD_WRITE, c, c * 4096, 4096))
                .await
                .unwrap();
            cw.write_all(&[7u8; 4096]).await.unwrap();
        }
        cw.write_all(&req(NBD_CMD_READ, 10, 0, 8192)).await.unwrap();
        cw.write_all(&req(NBD_CMD_READ, 11, 1 << 20, 512))
            .await
            .unwrap();
        cw.write_all(&req(NBD_CMD_FLUSH, 12, 0, 0)).await.unwrap();
        cw.write_all(&req(99, 13, 0, 0)).await.unwrap();
        cw.write_all(&req(NBD_CMD_TRIM, 14, 0, 0)).await.unwrap();
        // Read, refused read, flush, unknown command, empty trim: answered.
        let mut errors = std::collections::HashMap::new();
        for _ in 0..5 {
            let mut h = [0u8; SIMPLE_REPLY_LEN];
            cr.read_exact(&mut h).await.unwrap();
            let (err, cookie) = parse_simple_reply(&h).unwrap();
            if cookie == 10 {
                let mut d = vec![0u8; 8192];
                cr.read_exact(&mut d).await.unwrap();
            }
            errors.insert(cookie, err);
        }
        assert_eq!(errors[&10], 0);
        assert_ne!(errors[&11], 0);
        assert_ne!(errors[&13], 0);
        let snap = stats.snapshot();
        let by = |name: &str| {
            snap.commands
                .iter()
                .find(|c| c.command == name)
                .cloned()
                .unwrap()
        };
        assert_eq!((snap.in_flight, snap.connections), (3, 1));
        assert_eq!(
            (by("read").requests, by("read").errors, by("read").bytes),
            (2, 1, 8192)
        );
        assert_eq!((by("flush").requests, by("flush").errors), (1, 0));
        assert_eq!((by("other").requests, by("other").errors), (1, 1));
        assert_eq!((by("trim").requests, by("trim").bytes), (1, 0));
        assert_eq!(by("write").requests, 0);
        // Two writes finish; the third is still running when the connection goes.
        let gates: Vec<_> = lock(&export.0.gate).drain(..).collect();
        assert_eq!(gates.len(), 3);
        let mut gates = gates.into_iter();
        for tx in gates.by_ref().take(2) {
            tx.send(()).unwrap();
        }
        for _ in 0..2 {
            assert_eq!(read_reply(&mut cr).await.0, 0);
        }
        let snap = stats.snapshot();
        assert_eq!(snap.in_flight, 1);
        let w = snap.commands.iter().find(|c| c.command == "write").unwrap();
        assert_eq!((w.requests, w.errors, w.bytes), (2, 0, 8192));
        assert_eq!(w.buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        server.abort();
        assert!(server.await.unwrap_err().is_cancelled());
        let snap = stats.snapshot();
        assert_eq!((snap.in_flight, snap.connections), (0, 0));
        drop(gates);
    }

    /// An export that holds writes until `end_batch` and completes them there, on the
    /// connection's thread (as the logger's plug does).
    #[derive(Default)]
    struct BatchingExport {
        held: Mutex<Vec<oneshot::Sender<()>>>,
        open: AtomicBool,
        batches: Mutex<Vec<usize>>,
    }

    impl Export for BatchingExport {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read(&self, _: u64, len: u32) -> BoxFut<io::Result<Bytes>> {
            Box::pin(async move { Ok(Bytes::from(vec![0u8; len as usize])) })
        }
        fn write(&self, _: u64, _: Bytes, _: bool) -> BoxFut<io::Result<()>> {
            assert!(self.open.load(Ordering::SeqCst), "write outside a batch");
            let (tx, rx) = oneshot::channel();
            lock(&self.held).push(tx);
            Box::pin(async move { rx.await.map_err(|_| io::Error::other("dropped")) })
        }
        fn flush(&self) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, _: u64, _: u32, _: bool) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u32, _: bool) -> BoxFut<io::Result<()>> {
            Box::pin(async { Ok(()) })
        }
        fn begin_batch(&self) {
            assert!(!self.open.swap(true, Ordering::SeqCst), "nested batch");
        }
        fn end_batch(&self) {
            assert!(self.open.swap(false, Ordering::SeqCst), "end without begin");
            let held: Vec<_> = lock(&self.held).drain(..).collect();
            if !held.is_empty() {
                lock(&self.batches).push(held.len());
            }
            for tx in held {
                let _ = tx.send(());
            }
        }
    }

    /// Requests read in one go are started between `begin_batch` and `end_batch`;
    /// those the export completes at `end_batch` (on the connection's own thread,
    /// while its wake-ups are suspended) are answered without another wake-up.
    #[tokio::test]
    async fn requests_read_together_are_one_batch_and_answered() {
        let export = Arc::new(BatchingExport::default());
        let (client, server) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(server);
        let server = tokio::spawn(transmission(BytesMut::new(), sr, sw, export.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        for round in 0..3u64 {
            let n = 48u64;
            let mut burst = Vec::new();
            for c in 0..n {
                burst.extend_from_slice(&req(NBD_CMD_WRITE, round * n + c, c * 512, 512));
                burst.extend_from_slice(&[c as u8; 512]);
            }
            cw.write_all(&burst).await.unwrap();
            let mut seen = vec![false; n as usize];
            for _ in 0..n {
                let (err, cookie) =
                    tokio::time::timeout(Duration::from_secs(10), read_reply(&mut cr))
                        .await
                        .expect("a request completed at end_batch was never answered");
                assert_eq!(err, 0);
                assert!(!std::mem::replace(
                    &mut seen[(cookie - round * n) as usize],
                    true
                ));
            }
        }
        cw.write_all(&req(NBD_CMD_DISC, 0, 0, 0)).await.unwrap();
        server.await.unwrap().unwrap();
        let batches = lock(&export.batches).clone();
        assert_eq!(batches.iter().sum::<usize>(), 144);
        assert!(
            batches.iter().any(|&b| b > 1),
            "requests sent together were never batched: {batches:?}"
        );
    }

    /// Large writes arrive in small pieces, mixed with small ones and reads, without
    /// the client waiting for replies; a client that reads replies only at the end
    /// (with a tiny pipe) still gets them all.
    #[tokio::test]
    async fn large_payloads_in_pieces_and_slow_reader() {
        let export = Arc::new(GatedExport {
            data: Mutex::new(vec![0u8; 8 << 20]),
            gate: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let releaser = {
            let (export, stop) = (export.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let batch: Vec<_> = lock(&export.gate).drain(..).collect();
                    for tx in batch {
                        let _ = tx.send(());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let (client, server) = tokio::io::duplex(997);
        let (sr, sw) = tokio::io::split(server);
        let server = tokio::spawn(transmission(BytesMut::new(), sr, sw, export.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let sizes = [3 << 20, 1, 70_000, 4096, 65_536, 65_537, 1 << 20];
        let sender = tokio::spawn(async move {
            let mut off = 0u64;
            for (i, &len) in sizes.iter().enumerate() {
                cw.write_all(&req(NBD_CMD_WRITE, i as u64, off, len as u32))
                    .await
                    .unwrap();
                let d: Vec<u8> = (0..len).map(|j| (j % 251) as u8 ^ i as u8).collect();
                cw.write_all(&d).await.unwrap();
                off += len as u64;
            }
            cw.write_all(&req(NBD_CMD_READ, 100, 0, 5 << 20))
                .await
                .unwrap();
            cw.write_all(&req(NBD_CMD_DISC, 0, 0, 0)).await.unwrap();
            cw
        });
        let mut got_read = false;
        for _ in 0..sizes.len() + 1 {
            let (err, cookie) = read_reply(&mut cr).await;
            assert_eq!(err, 0);
            if cookie == 100 {
                let mut d = vec![0u8; 5 << 20];
                cr.read_exact(&mut d).await.unwrap();
                got_read = true;
            }
        }
        assert!(got_read);
        let _cw = sender.await.unwrap();
        server.await.unwrap().unwrap();
        stop.store(true, Ordering::SeqCst);
        releaser.join().unwrap();
        let data = lock(&export.data).clone();
        let mut off = 0usize;
        for (i, &len) in sizes.iter().enumerate() {
            for j in 0..len {
                assert_eq!(
                    data[off + j],
                    (j % 251) as u8 ^ i as u8,
                    "write {i} byte {j}"
                );
            }
            off += len;
        }
    }
}
