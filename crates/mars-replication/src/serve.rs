//! The source side of replication: what a member answers to a joining or
//! fetching member (sync blocks from the primary's logger or an up-to-date
//! secondary's disk, logfile lists and chunks from the resource directory).
//!
//! It never takes the daemon's state lock: what it serves is looked up in
//! [`Served`], which the daemon updates as it opens and closes loggers and
//! secondaries, under a lock held only for the lookup.

use crate::logdir::*;
use crate::meta;
use crate::progress::Progress;
use crate::{policy, Cluster};
use anyhow::{bail, Context, Result};
use mars_logger::disk::{AlignedBuf, DIRECT_ALIGN};
use mars_logger::Logger;
use mars_proto::{read_msg, write_msg, write_packed, Codec, Msg, Packed, Packer};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What this node serves of each resource: its logger (it writes the log) and
/// its secondary (it replays), as the daemon last set them; and what it sent
/// of each resource's data since it started.
#[derive(Default)]
pub struct Served(
    RwLock<HashMap<String, ServedResource>>,
    Mutex<HashMap<String, LinkStats>>,
);

/// Data this node sent to fetching and syncing members (chunks and blocks,
/// not messages), since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStats {
    /// Bytes of data sent, as stored.
    pub raw_bytes: u64,
    /// Bytes of data frames sent on the link (headers included): less than
    /// `raw_bytes` where compression paid off.
    pub wire_bytes: u64,
    /// Data frames sent, and of those compressed.
    pub frames: u64,
    pub compressed_frames: u64,
}

impl LinkStats {
    fn add(&mut self, p: &Packed) {
        self.raw_bytes += p.raw_len() as u64;
        self.wire_bytes += p.wire_len() as u64;
        self.frames += 1;
        self.compressed_frames += u64::from(p.compressed());
    }
}

#[derive(Clone, Default)]
pub struct ServedResource {
    pub logger: Option<Arc<Logger>>,
    pub secondary: Option<ServedSecondary>,
}

#[derive(Clone)]
pub struct ServedSecondary {
    pub progress: Arc<Mutex<Progress>>,
    /// The resource size the secondary runs with.
    pub size: u64,
    /// This member's disk (from its own configuration, never from a peer).
    pub disk: PathBuf,
    /// Its replay, as a freeze (verify, repair) holds it.
    pub gate: Arc<crate::verify::ReplayGate>,
}

impl Served {
    pub fn set_logger(&self, res: &str, l: Option<Arc<Logger>>) {
        let mut m = self.0.write();
        m.entry(res.to_string()).or_default().logger = l;
        Self::drop_empty(&mut m, res);
    }

    pub fn set_secondary(&self, res: &str, s: Option<ServedSecondary>) {
        let mut m = self.0.write();
        m.entry(res.to_string()).or_default().secondary = s;
        Self::drop_empty(&mut m, res);
    }

    pub fn remove(&self, res: &str) {
        self.0.write().remove(res);
    }

    fn drop_empty(m: &mut HashMap<String, ServedResource>, res: &str) {
        if m.get(res)
            .is_some_and(|r| r.logger.is_none() && r.secondary.is_none())
        {
            m.remove(res);
        }
    }

    pub fn get(&self, res: &str) -> ServedResource {
        self.0.read().get(res).cloned().unwrap_or_default()
    }

    pub fn logger(&self, res: &str) -> Option<Arc<Logger>> {
        self.0.read().get(res)?.logger.clone()
    }

    /// What this node sent of `res`'s data since it started.
    pub fn link_stats(&self, res: &str) -> LinkStats {
        self.1.lock().get(res).copied().unwrap_or_default()
    }

    fn count(&self, res: &str, p: &Packed) {
        let mut m = self.1.lock();
        match m.get_mut(res) {
            Some(st) => st.add(p),
            None => {
                let mut st = LinkStats::default();
                st.add(p);
                m.insert(res.to_string(), st);
            }
        }
    }
}

/// zstd contexts of one stream, used again (one per answer being prepared).
#[derive(Clone)]
struct Packers {
    level: i32,
    pool: Arc<Mutex<Vec<Packer>>>,
}

impl Packers {
    /// Packers for answers to a requester that accepts `accept`, at the
    /// resource's level; None: data goes raw.
    fn new(accept: &[Codec], level: i32) -> Option<Packers> {
        accept.contains(&Codec::Zstd).then(|| Packers {
            level,
            pool: Arc::default(),
        })
    }

    /// The frame of `data` (off the async runtime: compression takes time),
    /// and the packer holding its body when it is compressed.
    fn pack(this: Option<&Packers>, data: &[u8]) -> (Packed, Option<Packer>) {
        let Some(ps) = this else {
            return (Packed::raw(data), None);
        };
        let packer = ps
            .pool
            .lock()
            .pop()
            .map(Ok)
            .unwrap_or_else(|| Packer::new(ps.level));
        match packer {
            Ok(mut p) => {
                let packed = p.pack(data);
                (packed, Some(p))
            }
            Err(e) => {
                tracing::warn!("no zstd context, sending raw: {e}");
                (Packed::raw(data), None)
            }
        }
    }

    fn give_back(this: Option<&Packers>, p: Option<Packer>) {
        if let (Some(ps), Some(p)) = (this, p) {
            let mut pool = ps.pool.lock();
            if pool.len() < FETCH_SERVE_AHEAD + 2 {
                pool.push(p);
            }
        }
    }
}

/// Send one data frame prepared by [`Packers::pack`].
async fn send_packed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    packed: &Packed,
    packer: Option<&Packer>,
    data: &[u8],
) -> Result<()> {
    let body = match packer {
        Some(p) => p.body(packed, data),
        None => data,
    };
    write_packed(w, packed, body).await?;
    Ok(())
}

/// Answers replication messages for one node.
pub struct Server {
    /// The node's directory of resource directories.
    pub resources: PathBuf,
    pub me: String,
    pub cluster: Arc<dyn Cluster>,
    pub served: Arc<Served>,
}

impl Server {
    /// Answer `msg` and the requests that follow it on `s`, from node `from`
    /// (authenticated: its certificate); on an error, send `Refused` with the
    /// reason and close the connection gently. Only members of a resource
    /// are served its data.
    pub async fn serve_data(&self, msg: Msg, s: &mut crate::PeerStream, from: &str) -> Result<()> {
        let mut msg = msg;
        let res = loop {
            // A stream of SyncBlock requests ends with the next message, read ahead.
            match self.data_reply(msg, s, from).await {
                Ok(Some(next)) => msg = next,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let Err(e) = res else {
            return Ok(());
        };
        let reason = format!("{e:#}");
        let _ = write_msg(
            s,
            &Msg::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        linger_close(s).await;
        Err(anyhow::anyhow!(reason))
    }

    fn me(&self) -> &str {
        &self.me
    }

    /// How the answers of a stream of `res` requests that accept `accept` are
    /// packed: at the level the resource's setting names, or the default
    /// when this node knows none (the requester's setting is newer).
    fn packers(&self, res: &str, accept: &[Codec]) -> Option<Packers> {
        if accept.is_empty() {
            return None;
        }
        let level = {
            let store = self.cluster.store().lock();
            meta::resource(&store, res)
                .map(|(rr, _)| meta::compression(&store, &rr))
                .filter(|c| c.codec == meta::LinkCodec::Zstd)
                .map_or(mars_proto::codec::DEFAULT_LEVEL, |c| c.level)
        };
        Packers::new(accept, level)
    }

    /// A request names a resource incarnation (`NAME@ID`, see
    /// `mars_meta::schema::ResRef`): answered only for the incarnation that
    /// owns the name here, and with the name from then on. A secondary of a
    /// deleted incarnation never reads the logs or disk of a new one of the
    /// same name.
    fn resolve(&self, mut msg: Msg, from: &str) -> Result<Msg> {
        let res = match &mut msg {
            Msg::SyncStart { res }
            | Msg::SyncEnd { res }
            | Msg::LogStatus { res }
            | Msg::SyncBlock { res, .. }
            | Msg::LogList { res }
            | Msg::Fetch { res, .. }
            | Msg::Freeze { res, .. }
            | Msg::FrozenRead { res, .. }
            | Msg::FrozenRepair { res, .. }
            | Msg::FrozenCorrect { res, .. }
            | Msg::Thaw { res } => res,
            _ => return Ok(msg),
        };
        let Some(asked) = meta::ResRef::parse(res) else {
            bail!("{res:?} names no resource incarnation (NAME@ID)");
        };
        // Live, and the one this node holds under its name (after a name
        // clash, members of the shadowed incarnation serve it too).
        let entry = meta::incarnation(&self.cluster.store().lock(), &asked);
        if entry
            .as_ref()
            .is_some_and(|e| !e.members.iter().any(|m| m == from))
        {
            bail!("{from} is no member of {asked}: its data is served to members only");
        }
        let live = entry.is_some();
        let held = crate::logdir::read_incarnation(&self.resources.join(&asked.name));
        match (live, held) {
            (true, Some(h)) if h == asked => {
                *res = asked.name;
                Ok(msg)
            }
            (true, Some(h)) => bail!("{} holds {h} here, not {asked}", self.me()),
            (true, None) => bail!("{} holds no copy of {asked}", self.me()),
            (false, _) => bail!("unknown resource {asked} (deleted?)"),
        }
    }

    /// The directory of `res`, once it is known to be a resource of the cluster
    /// (its name checked before it becomes a path).
    pub(crate) fn res_dir(&self, res: &str) -> Result<PathBuf> {
        if !meta::valid_name(res) || meta::resource(&self.cluster.store().lock(), res).is_none() {
            bail!("unknown resource {res:?}");
        }
        Ok(self.resources.join(res))
    }
}

const MAX_CHUNK: u32 = 8 << 20;

impl Server {
    async fn primary_logger(&self, res: &str) -> Result<Arc<Logger>> {
        match self.served.logger(res) {
            Some(l) => Ok(l),
            None => bail!(
                "{} does not write the log of {res} (not its primary, or its disk is detached): a full sync is served by the primary",
                self.me()
            ),
        }
    }

    /// Answer one replication message. A `SyncBlock` starts a stream of them, answered
    /// by [`Server::serve_sync_blocks`]; the message after the stream is returned.
    async fn data_reply(
        &self,
        msg: Msg,
        s: &mut crate::PeerStream,
        from: &str,
    ) -> Result<Option<Msg>> {
        match self.resolve(msg, from)? {
            Msg::SyncStart { res } => {
                let (pos, size) = self.sync_position(&res, false).await?;
                let dir = self.res_dir(&res)?;
                let logfile = tokio::task::spawn_blocking(move || base_logfile(&dir, pos)).await?;
                write_msg(s, &Msg::SyncInfo { pos, size, logfile }).await?;
            }
            Msg::SyncEnd { res } => {
                let (pos, size) = self.sync_position(&res, true).await?;
                let logfile = None;
                write_msg(s, &Msg::SyncInfo { pos, size, logfile }).await?;
            }
            Msg::LogStatus { res } => {
                let l = self.primary_logger(&res).await?;
                let st = l.status();
                write_msg(
                    s,
                    &Msg::SyncInfo {
                        pos: st.synced_pos,
                        size: l.size(),
                        logfile: None,
                    },
                )
                .await?;
            }
            m @ (Msg::Freeze { .. }
            | Msg::FrozenRead { .. }
            | Msg::FrozenRepair { .. }
            | Msg::FrozenCorrect { .. }
            | Msg::Thaw { .. }) => self.serve_frozen(m, s, from).await?,
            m @ Msg::SyncBlock { .. } => {
                return match self.serve_sync_blocks(m, s, from).await? {
                    Some(next @ (Msg::SyncEnd { .. } | Msg::SyncStart { .. })) => Ok(Some(next)),
                    Some(other) => bail!("unexpected {other:?} after SyncBlock"),
                    None => Ok(None),
                };
            }
            Msg::LogList { res } => {
                let dir = self.res_dir(&res)?;
                // Asked before listing: a logfile that becomes current after this is
                // clamped to nothing below, never to more than what is durable.
                let durable_end = self.durable_end(&res);
                let me = durable_end.is_none().then(|| self.me().to_string());
                let (files, versions, held_back) =
                    tokio::task::spawn_blocking(move || list_for_fetch(&dir, me.as_deref()))
                        .await??;
                // A writer offers what is durable only (see `policy::offer`); a
                // clamped logfile will grow.
                let open = durable_end.is_some() || held_back;
                let files = policy::offer(files, durable_end.as_ref().map(|(_, synced)| *synced));
                write_msg(
                    s,
                    &Msg::Logs {
                        files,
                        versions,
                        open,
                        writes: durable_end.is_some(),
                    },
                )
                .await?;
            }
            m @ Msg::Fetch { .. } => return self.serve_fetches(m, s, from).await,
            other => bail!("unexpected message {other:?}"),
        }
        Ok(None)
    }

    /// Answer `Fetch` requests from `first` on, in order: each chunk is read (off the
    /// runtime, into a buffer used again) as soon as its request arrives, up to
    /// `FETCH_SERVE_AHEAD` at once, so that the device or page-cache read of the next
    /// chunks overlaps sending this one. Returns the first other message (None at the
    /// end of the stream). An error ends the answers where it happened: the chunks
    /// asked for before it are sent first.
    async fn serve_fetches(
        &self,
        first: Msg,
        s: &mut crate::PeerStream,
        from: &str,
    ) -> Result<Option<Msg>> {
        let (mut rd, mut wr) = tokio::io::split(&mut *s);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<FetchAnswer>(FETCH_SERVE_AHEAD);
        let buffers: FetchBuffers = Arc::default();
        let pool = buffers.clone();
        // Per stream: the codecs its first request accepts, the level set now.
        let packers = match &first {
            Msg::Fetch { res, accept, .. } => self.packers(res, accept),
            _ => None,
        };
        let stream_res = match &first {
            Msg::Fetch { res, .. } => res.clone(),
            _ => String::new(),
        };
        let reader_packers = packers.clone();
        let reader = async move {
            let mut msg = first;
            loop {
                let Msg::Fetch {
                    res,
                    file,
                    offset,
                    max,
                    accept,
                } = msg
                else {
                    return Ok::<_, anyhow::Error>(Some(msg));
                };
                // Every request of a stream accepts the same codecs.
                let packers = reader_packers.as_ref().filter(|_| !accept.is_empty());
                let answer = match self
                    .fetch_answer(&res, &file, offset, max, &pool, packers)
                    .await
                {
                    Ok(a) => a,
                    Err(e) => FetchAnswer::Failed(e),
                };
                let failed = matches!(answer, FetchAnswer::Failed(_));
                if tx.send(answer).await.is_err() || failed {
                    return Ok(None); // the writing half reports what ended the stream
                }
                msg = match next_request(&mut rd).await? {
                    // The message after the stream is resolved where it is answered.
                    Some(m @ Msg::Fetch { .. }) => self.resolve(m, from)?,
                    Some(m) => m,
                    None => return Ok(None),
                };
            }
        };
        let served = self.served.clone();
        let counted = stream_res_name(&stream_res);
        let writer = async move {
            while let Some(answer) = rx.recv().await {
                let (file, offset, (buf, packed, packer)) = match answer {
                    FetchAnswer::Failed(e) => return Err(e),
                    FetchAnswer::Reading { file, offset, job } => (file, offset, job.await??),
                };
                write_msg(
                    &mut wr,
                    &Msg::Chunk {
                        file,
                        offset,
                        len: buf.data().len() as u32,
                    },
                )
                .await?;
                send_packed(&mut wr, &packed, packer.as_ref(), buf.data()).await?;
                served.count(&counted, &packed);
                Packers::give_back(packers.as_ref(), packer);
                let mut pool = buffers.lock();
                if pool.len() < FETCH_SERVE_AHEAD + 2 {
                    pool.push(buf);
                }
            }
            Ok::<(), anyhow::Error>(())
        };
        let (next, ()) = tokio::try_join!(reader, writer)?;
        Ok(next)
    }

    /// The answer to one `Fetch`: what of `file` from `offset` on (at most `max`
    /// bytes) may be sent now, from the logger's memory or read from the file.
    async fn fetch_answer(
        &self,
        res: &str,
        file: &str,
        offset: u64,
        max: u32,
        pool: &FetchBuffers,
        packers: Option<&Packers>,
    ) -> Result<FetchAnswer> {
        let res_dir = self.res_dir(res)?;
        let Some(name) = mars_logfmt::parse_logfile_name(file) else {
            bail!("bad logfile name {file:?}");
        };
        let path = res_dir.join(file);
        let mut max = max.min(MAX_CHUNK) as usize;
        // Up to what is durable, as in `LogList`, in any file of a writing node.
        let logger = self.served.logger(res);
        let durable_end = logger.as_deref().map(durable_end_of);
        if durable_end.is_none() && unrecovered_own(&path, self.me()) {
            max = 0;
        }
        if let Some((_, synced)) = durable_end {
            let start = logfile_start(&path)?;
            max = policy::chunk_limit(start, Some(synced), offset, max as u64) as usize;
        }
        let file = file.to_string();
        let room = max.next_multiple_of(DIRECT_ALIGN);
        let mut buf = pool
            .lock()
            .pop()
            .filter(|b| b.capacity() >= room)
            .unwrap_or_else(|| AlignedBuf::new(room));
        let packers = packers.cloned();
        // The log's tail from the writer's memory: no device read (the log is
        // written with O_DIRECT, so it is not in the page cache).
        if let Some(l) = &logger {
            if name.node == self.me() && max > 0 {
                if let Some(n) = l.read_recent(name.seq, offset, &mut buf.room()[..max]) {
                    buf.set_len(n);
                    let job = tokio::task::spawn_blocking(move || {
                        let (packed, packer) = Packers::pack(packers.as_ref(), buf.data());
                        Ok((buf, packed, packer))
                    });
                    return Ok(FetchAnswer::Reading { file, offset, job });
                }
            }
        }
        let job = tokio::task::spawn_blocking(move || {
            let buf = read_chunk(&path, name.seq, offset, max, buf)?;
            let (packed, packer) = Packers::pack(packers.as_ref(), buf.data());
            Ok((buf, packed, packer))
        });
        Ok(FetchAnswer::Reading { file, offset, job })
    }

    /// Answer `SyncBlock` requests from `first` on: each block is read and hashed off
    /// the runtime as soon as its request arrives (up to `SYNC_SERVE_AHEAD` at once,
    /// so that both CPUs and the joiner's window stay busy), and answered in order.
    /// Returns the first other message (None at the end of the stream).
    async fn serve_sync_blocks(
        &self,
        first: Msg,
        s: &mut crate::PeerStream,
        from: &str,
    ) -> Result<Option<Msg>> {
        type Block = Option<(Vec<u8>, Packed, Option<Packer>)>;
        type Answer = tokio::task::JoinHandle<std::io::Result<(u64, u32, Block)>>;
        let (mut rd, mut wr) = tokio::io::split(&mut *s);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Answer>(SYNC_SERVE_AHEAD);
        // Block buffers, used again: no allocation, zeroing or page faults per block.
        let buffers: Arc<parking_lot::Mutex<Vec<Vec<u8>>>> = Arc::default();
        let pool = buffers.clone();
        let (packers, stream_res) = match &first {
            Msg::SyncBlock { res, accept, .. } => (self.packers(res, accept), res.clone()),
            _ => (None, String::new()),
        };
        let reader_packers = packers.clone();
        let reader = async move {
            let mut msg = first;
            loop {
                let Msg::SyncBlock {
                    res,
                    offset,
                    len,
                    digest,
                    accept,
                } = msg
                else {
                    return Ok(Some(msg));
                };
                let packers = reader_packers.clone().filter(|_| !accept.is_empty());
                // Looked up for every block: a demote or detach during the sync
                // ends the answers from this logger (on a secondary: a split
                // brain, a halted replay).
                let src = self.sync_source(&res).await?;
                if len > MAX_CHUNK
                    || offset
                        .checked_add(len as u64)
                        .is_none_or(|e| e > src.size())
                {
                    bail!("block {offset}+{len} is out of range");
                }
                let pool = pool.clone();
                let answer = tokio::task::spawn_blocking(move || {
                    let block = sync_answer(&src, offset, len, &digest, &pool)?;
                    let block = block.map(|data| {
                        let (packed, packer) = Packers::pack(packers.as_ref(), &data);
                        (data, packed, packer)
                    });
                    Ok((offset, len, block))
                });
                if tx.send(answer).await.is_err() {
                    return Ok(None); // the writing half failed; its error is the one to report
                }
                msg = match next_request(&mut rd).await? {
                    Some(m @ Msg::SyncBlock { .. }) => self.resolve(m, from)?,
                    Some(m) => m,
                    None => return Ok(None),
                };
            }
        };
        let served = self.served.clone();
        let counted = stream_res_name(&stream_res);
        let writer = async move {
            while let Some(answer) = rx.recv().await {
                match answer.await?? {
                    (_, _, None) => write_msg(&mut wr, &Msg::Same).await?,
                    (offset, len, Some((data, packed, packer))) => {
                        write_msg(&mut wr, &Msg::BlockData { offset, len }).await?;
                        send_packed(&mut wr, &packed, packer.as_ref(), &data).await?;
                        served.count(&counted, &packed);
                        Packers::give_back(packers.as_ref(), packer);
                        buffers.lock().push(data);
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        };
        let (next, ()) = tokio::try_join!(reader, writer)?;
        Ok(next)
    }
}

/// The resource name of a stream's first request (`NAME@ID`, or the name
/// once resolved): what its bytes are counted under.
fn stream_res_name(res: &str) -> String {
    match meta::ResRef::parse(res) {
        Some(r) => r.name,
        None => res.to_string(),
    }
}

/// Answers of a full sync queued on the serving side (blocks read and hashed at
/// once: this many, plus the one being sent and the one just requested).
const SYNC_SERVE_AHEAD: usize = 4;

/// End a connection whose peer may still be sending requests (a fetcher keeps
/// several in flight): send FIN, then read and drop what arrives until the peer
/// closes too (at most `LINGER`). Closing with unread bytes in the receive buffer
/// makes the kernel send a reset, and a reset throws away what the peer has not
/// read yet: the answers before the error and the `Refused` that says why.
async fn linger_close(s: &mut crate::PeerStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; 64 << 10];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// How long [`linger_close`] waits for the peer to close.
const LINGER: Duration = Duration::from_secs(2);

/// The next request of a stream of them; None when the peer closed the connection.
async fn next_request<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Msg>> {
    match read_msg(rd).await {
        Ok(m) => Ok(Some(m)),
        Err(mars_proto::ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Fetch answers being read on the serving side at once (besides the one being sent).
const FETCH_SERVE_AHEAD: usize = 4;

/// Chunk buffers of one fetch stream, used again.
type FetchBuffers = Arc<parking_lot::Mutex<Vec<AlignedBuf>>>;

/// A chunk read (from the logger's memory or the file) and packed.
type PackedChunk = (AlignedBuf, Packed, Option<Packer>);

/// One `Fetch` answer, queued in request order.
enum FetchAnswer {
    /// Being read and packed.
    Reading {
        file: String,
        offset: u64,
        job: tokio::task::JoinHandle<Result<PackedChunk>>,
    },
    /// The request cannot be answered: the stream ends here.
    Failed(anyhow::Error),
}

/// The answer to one `SyncBlock`: None when the block's digest is `digest`, else the
/// block. Buffers come from and go back to `pool`.
fn sync_answer(
    src: &SyncSource,
    offset: u64,
    len: u32,
    digest: &str,
    pool: &parking_lot::Mutex<Vec<Vec<u8>>>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = pool.lock().pop().unwrap_or_default();
    buf.resize(len as usize, 0);
    let r = src.read_into(offset, &mut buf);
    if r.is_ok() && !crate::digest::matches(digest, &buf) {
        return Ok(Some(buf));
    }
    pool.lock().push(buf);
    r.map(|()| None)
}

/// Where a full sync's blocks come from on the serving side.
enum SyncSource {
    /// The primary: its logger reads the newest data (not yet written back too).
    Primary(Arc<Logger>),
    /// An up-to-date secondary: its disk, which replay moves forward only (records
    /// after `replayed`, which the joiner replays again from its start position).
    Secondary {
        disk: std::fs::File,
        size: u64,
        replayed: u64,
        /// Its block checksums: no block that mismatches is sent.
        csum: mars_logger::csum::CsumHandle,
    },
}

impl SyncSource {
    fn size(&self) -> u64 {
        match self {
            SyncSource::Primary(l) => l.size(),
            SyncSource::Secondary { size, .. } => *size,
        }
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            SyncSource::Primary(l) => l.read_into(offset, buf),
            SyncSource::Secondary { disk, csum, .. } => {
                disk.read_exact_at(buf, offset)?;
                // Rot is never copied: the request fails, naming the blocks.
                let mut read = |b: &mut [u8], o: u64| disk.read_exact_at(b, o);
                match csum.verify(offset, buf, &|_, _| true, &mut read)? {
                    Ok(()) => Ok(()),
                    Err(bad) => Err(bad.into()),
                }
            }
        }
    }
}

impl Server {
    /// What this node serves a full sync of `res` from: the log writer's logger, or
    /// the disk of a secondary that is a consistent image and goes on replaying.
    async fn sync_source(&self, res: &str) -> Result<SyncSource> {
        let served = self.served.get(res);
        if let Some(l) = served.logger {
            return Ok(SyncSource::Primary(l));
        }
        let me = self.me();
        let Some(sec) = served.secondary else {
            bail!("{me} neither writes nor replays {res} (its disk is detached?): a full sync is served by the primary or an up-to-date member");
        };
        let p = sec.progress.lock().clone();
        if !policy::may_serve_disk(&p) {
            bail!("{me}'s disk of {res} is no consistent image to copy now (syncing, starting, split brain, or replay stopped): a full sync is served by the primary or an up-to-date member");
        }
        let path = sec.disk;
        let disk =
            std::fs::File::open(&path).with_context(|| format!("disk {}", path.display()))?;
        let Some(csum) = mars_logger::csum::find(&self.res_dir(res)?) else {
            bail!("{me}'s block checksums of {res} are not loaded (yet): a full sync is served by the primary or an up-to-date member");
        };
        Ok(SyncSource::Secondary {
            disk,
            size: sec.size,
            replayed: p.replayed,
            csum,
        })
    }

    /// The log position a full sync of `res` served here starts from, or (`end`)
    /// where its copy ended, and the device size.
    async fn sync_position(&self, res: &str, end: bool) -> Result<(u64, u64)> {
        Ok(match self.sync_source(res).await? {
            // Where the copy ended: everything it may hold made durable first,
            // so that a crash of the primary cannot take back what the joiner
            // copied (its writeback and fetch never go past what is durable).
            SyncSource::Primary(l) if end => {
                l.flush().await.map_err(|e| anyhow::anyhow!("flush: {e}"))?;
                (l.status().synced_pos, l.size())
            }
            SyncSource::Primary(l) => (l.status().logged_pos, l.size()),
            // The disk holds every record before `replayed` and moves on only by
            // replaying later ones: the joiner replays from there. Where the copy
            // ended, the blocks read may hold any record this node has (replay
            // reports its position after a step): the end of its log.
            SyncSource::Secondary { size, replayed, .. } if !end => (replayed, size),
            SyncSource::Secondary { size, replayed, .. } => {
                let dir = self.res_dir(res)?;
                let held = tokio::task::spawn_blocking(move || local_log_end(&dir)).await?;
                (held.max(replayed), size)
            }
        })
    }

    fn durable_end(&self, res: &str) -> Option<(String, u64)> {
        self.served.logger(res).as_deref().map(durable_end_of)
    }
}
