//! A message on its way to an API, kept where a retry can read it again: in memory while it is
//! small, then in a temporary file under `data_dir` (`0600`, removed when the message is done),
//! so memory does not grow with the message.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

/// Bytes kept in memory before the message moves to a file; also the size of each write and read.
pub const IN_MEMORY: usize = 256 * 1024;

pub struct Spill {
    dir: Arc<PathBuf>,
    /// The message while it is small; afterwards what is not yet written to the file.
    mem: Vec<u8>,
    file: Option<Arc<tempfile::NamedTempFile>>,
    len: u64,
}

/// File work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("file task failed: {e}")))?
}

impl Spill {
    pub fn new(dir: Arc<PathBuf>) -> Spill {
        Spill {
            dir,
            mem: Vec::new(),
            file: None,
            len: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub async fn push(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.mem.extend_from_slice(bytes);
        self.len += bytes.len() as u64;
        if self.mem.len() >= IN_MEMORY {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Moves what is in memory to the file (created on first use).
    async fn write_out(&mut self) -> std::io::Result<()> {
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let dir = self.dir.clone();
                let f = Arc::new(blocking(move || tempfile::NamedTempFile::new_in(&*dir)).await?);
                self.file = Some(f.clone());
                f
            }
        };
        let data = std::mem::take(&mut self.mem);
        let mut data = blocking(move || {
            (&mut file.as_file()).write_all(&data)?;
            Ok(data)
        })
        .await?;
        data.clear();
        self.mem = data;
        Ok(())
    }

    /// Everything pushed is readable.
    pub async fn done(&mut self) -> std::io::Result<()> {
        if self.file.is_some() && !self.mem.is_empty() {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Up to `n` bytes from the start.
    pub async fn prefix(&self, n: usize) -> std::io::Result<Vec<u8>> {
        match &self.file {
            None => Ok(self.mem[..n.min(self.mem.len())].to_vec()),
            Some(file) => {
                let path = file.path().to_path_buf();
                let n = n.min(self.len as usize);
                blocking(move || {
                    let mut out = vec![0; n];
                    std::fs::File::open(path)?.read_exact(&mut out)?;
                    Ok(out)
                })
                .await
            }
        }
    }

    /// The whole message (the Graph draft way, which parses it).
    pub async fn all(&self) -> std::io::Result<Vec<u8>> {
        self.prefix(self.len as usize).await
    }

    /// `head`, then the message from `from` on, in chunks: a request body that can be made again.
    pub fn stream(
        &self,
        head: Bytes,
        from: u64,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let source = match &self.file {
            None => Source::Memory(Bytes::copy_from_slice(&self.mem[from as usize..])),
            Some(file) => Source::File {
                path: file.path().to_path_buf(),
                at: from,
                handle: None,
            },
        };
        futures_util::stream::unfold((Some(head), source), |(head, mut source)| async move {
            if let Some(head) = head.filter(|h| !h.is_empty()) {
                return Some((Ok(head), (None, source)));
            }
            match source.next().await {
                Ok(Some(chunk)) => Some((Ok(chunk), (None, source))),
                Ok(None) => None,
                Err(e) => Some((Err(e), (None, Source::Done))),
            }
        })
    }
}

enum Source {
    Memory(Bytes),
    File {
        path: PathBuf,
        at: u64,
        handle: Option<std::fs::File>,
    },
    Done,
}

impl Source {
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        match std::mem::replace(self, Source::Done) {
            Source::Done => Ok(None),
            Source::Memory(mut bytes) => {
                if bytes.is_empty() {
                    return Ok(None);
                }
                let chunk = bytes.split_to(bytes.len().min(IN_MEMORY));
                *self = Source::Memory(bytes);
                Ok(Some(chunk))
            }
            Source::File { path, at, handle } => {
                let (chunk, path, handle) = blocking(move || {
                    let mut handle = match handle {
                        Some(h) => h,
                        None => {
                            let mut h = std::fs::File::open(&path)?;
                            h.seek(SeekFrom::Start(at))?;
                            h
                        }
                    };
                    let mut buf = vec![0; IN_MEMORY];
                    let n = read_full(&mut handle, &mut buf)?;
                    buf.truncate(n);
                    Ok((buf, path, handle))
                })
                .await?;
                if chunk.is_empty() {
                    return Ok(None);
                }
                *self = Source::File {
                    path,
                    at: at + chunk.len() as u64,
                    handle: Some(handle),
                };
                Ok(Some(Bytes::from(chunk)))
            }
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The directory for spilled messages, emptied of what a stopped relay left there.
pub fn prepare_dir(data_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = data_dir.join("api-tmp");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn collect(s: impl Stream<Item = std::io::Result<Bytes>>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(s);
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_large_message_goes_to_a_private_file_and_reads_back_from_any_offset_twice() {
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = Arc::new(prepare_dir(dir.path()).unwrap());
        let message: Vec<u8> = (0..IN_MEMORY * 3 + 17).map(|i| (i % 251) as u8).collect();
        let mut spill = Spill::new(spill_dir.clone());
        for part in message.chunks(10_000) {
            spill.push(part).await.unwrap();
        }
        spill.done().await.unwrap();
        let files: Vec<_> = std::fs::read_dir(&*spill_dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        let mode = files[0].metadata().unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        for _ in 0..2 {
            let got = collect(spill.stream(Bytes::from_static(b"New: head\r\n"), 5)).await;
            assert_eq!(&got[..11], b"New: head\r\n");
            assert_eq!(&got[11..], &message[5..]);
        }
        assert_eq!(spill.prefix(100).await.unwrap(), &message[..100]);
        drop(spill);
        assert_eq!(
            std::fs::read_dir(&*spill_dir).unwrap().count(),
            0,
            "removed when done"
        );
    }

    #[tokio::test]
    async fn a_small_message_stays_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = Arc::new(prepare_dir(dir.path()).unwrap());
        let mut spill = Spill::new(spill_dir.clone());
        spill.push(b"To: a@b\r\n\r\nhi\r\n").await.unwrap();
        spill.done().await.unwrap();
        assert_eq!(std::fs::read_dir(&*spill_dir).unwrap().count(), 0);
        let got = collect(spill.stream(Bytes::new(), 0)).await;
        assert_eq!(got, b"To: a@b\r\n\r\nhi\r\n");
    }
}
