//! Reading and writing whole frames on any async byte stream (QUIC streams in practice).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{decode, decode_len, encode, FrameError};

/// Why a frame could not be read from or written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The stream ended cleanly before any byte of a frame.
    #[error("stream closed")]
    Closed,
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport failed.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one frame and nothing past it (the body that follows stays in the stream).
///
/// Not cancel safe: a frame partly read when the future is dropped is lost.
pub async fn read_frame<R, M>(r: &mut R) -> Result<M, FrameIoError>
where
    R: AsyncRead + Unpin,
    M: serde::de::DeserializeOwned,
{
    Ok(decode(&read_payload(r).await?)?)
}

/// Reads exactly one frame's payload (without its prefix) and nothing past it. Not cancel
/// safe, as [`read_frame`].
pub async fn read_payload<R>(r: &mut R) -> Result<Vec<u8>, FrameIoError>
where
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; 4];
    let mut have = 0;
    while have < 4 {
        let n = r.read(&mut prefix[have..]).await?;
        if n == 0 {
            return Err(if have == 0 {
                FrameIoError::Closed
            } else {
                FrameError::Truncated { have, need: 4 }.into()
            });
        }
        have += n;
    }
    let len = decode_len(prefix)?;
    let mut payload = vec![0u8; len];
    let mut have = 0;
    while have < len {
        let n = r.read(&mut payload[have..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                have: have + 4,
                need: len + 4,
            }
            .into());
        }
        have += n;
    }
    Ok(payload)
}

/// Writes one frame.
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameIoError>
where
    W: AsyncWrite + Unpin,
    M: serde::Serialize,
{
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}
