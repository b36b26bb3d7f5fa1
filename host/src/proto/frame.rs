//! Length-prefixed frames: encode, decode and an incremental decoder, without IO.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Largest frame payload accepted or produced; a bigger one is a protocol error.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    Oversized {
        /// The announced length.
        len: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes received)")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes the frame needed.
        need: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The payload is not a valid binary head.
    #[error("malformed frame: {0}")]
    Invalid(&'static str),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<M: Serialize>(msg: &M) -> Result<Bytes, FrameError> {
    let payload = serde_json::to_vec(msg)?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::Oversized { len: payload.len() });
    }
    let mut out = BytesMut::with_capacity(4 + payload.len());
    // Cannot truncate: checked against MAX_FRAME_LEN above.
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    Ok(out.freeze())
}

/// Reads a length prefix, refusing lengths over [`MAX_FRAME_LEN`].
pub fn decode_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized { len });
    }
    Ok(len)
}

/// Decodes one frame payload (without its prefix).
pub fn decode<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Incremental decoder for a stream of frames that arrive in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `None` if more bytes are needed.
    pub fn next<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = decode_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let payload = self.buf.split_to(len);
        decode(&payload).map(Some)
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() {
            0 => Ok(()),
            have if have < 4 => Err(FrameError::Truncated { have, need: 4 }),
            have => {
                let need =
                    4 + u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                        as usize;
                Err(FrameError::Truncated { have, need })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Control, Register, Registered, RejectCode, Rejected};
    use crate::secret::Secret;

    fn register() -> Control {
        Control::Register(Register {
            version: 1,
            tunnel: "app".into(),
            token: Secret::new("t0ken"),
            connector_id: "c1".into(),
            conn_index: 0,
            software: None,
            digest: None,
            heads: Vec::new(),
            probe: false,
            sessions: false,
            trailers: false,
        })
    }

    #[test]
    fn round_trip_control_messages() {
        let msgs = vec![
            register(),
            Control::Registered(Registered {
                connection_id: 7,
                edge_id: "edge-a".into(),
                heads: None,
                trailers: true,
            }),
            Control::Rejected(Rejected {
                code: RejectCode::Unauthorized,
                message: "no".into(),
                retry_after_ms: Some(5000),
            }),
            Control::Drain,
        ];
        let mut dec = FrameDecoder::new();
        for m in &msgs {
            dec.push(&encode(m).unwrap());
        }
        for m in &msgs {
            assert_eq!(dec.next::<Control>().unwrap().as_ref(), Some(m));
        }
        assert!(dec.next::<Control>().unwrap().is_none());
        dec.finish().unwrap();
    }

    #[test]
    fn byte_at_a_time() {
        let frame = encode(&register()).unwrap();
        let mut dec = FrameDecoder::new();
        for (i, b) in frame.iter().enumerate() {
            dec.push(&[*b]);
            let got = dec.next::<Control>().unwrap();
            assert_eq!(got.is_some(), i == frame.len() - 1);
        }
    }

    #[test]
    fn truncated_frame_is_reported_at_end() {
        let frame = encode(&register()).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&frame[..frame.len() - 3]);
        assert!(dec.next::<Control>().unwrap().is_none());
        let err = dec.finish().unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { have, need } if have == frame.len() - 3 && need == frame.len())
        );
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0]);
        assert!(matches!(
            dec.finish(),
            Err(FrameError::Truncated { have: 2, need: 4 })
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.push(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert!(matches!(
            dec.next::<Control>(),
            Err(FrameError::Oversized { .. })
        ));
        assert!(decode_len(u32::MAX.to_be_bytes()).is_err());
        assert_eq!(
            decode_len((MAX_FRAME_LEN as u32).to_be_bytes()).unwrap(),
            MAX_FRAME_LEN
        );
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let huge = Control::Rejected(Rejected {
            code: RejectCode::BadRequest,
            message: "x".repeat(MAX_FRAME_LEN),
            retry_after_ms: None,
        });
        assert!(matches!(encode(&huge), Err(FrameError::Oversized { .. })));
    }

    #[test]
    fn unknown_message_kind_is_tolerated() {
        let payload = br#"{"type":"future-thing","x":1}"#;
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        let mut dec = FrameDecoder::new();
        dec.push(&frame);
        assert_eq!(dec.next::<Control>().unwrap(), Some(Control::Unknown));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let m: Control = decode(br#"{"type":"drain","reason":"upgrade"}"#).unwrap();
        assert_eq!(m, Control::Drain);
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode::<Control>(b"\x00\xffnot json"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Control>(br#"{"no_type":1}"#),
            Err(FrameError::Malformed(_))
        ));
    }
}
