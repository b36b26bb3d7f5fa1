//! Framed bodies: how a request stream carries bodies that end with trailers (gRPC's
//! `grpc-status`), which a raw body ending in FIN cannot.
//!
//! A request head with `trailers` set says that both bodies of its stream are framed: a
//! sequence of frames, each a tag byte, a big-endian `u32` length and that many bytes, until
//! FIN. Tag 0 is body data (at most [`MAX_DATA`] bytes); tag 1 is the trailers, a JSON list of
//! `[name, value]` pairs like the heads' headers (at most [`MAX_FRAME_LEN`]), after which no
//! frame may follow. The edge sets `trailers` only on connections whose connector said at
//! registration that it reads framed bodies (`Register.trailers`, acknowledged by
//! `Registered.trailers`), so that peers that predate it keep working with raw bodies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{FrameError, HeaderValueBytes, MAX_FRAME_LEN};

/// Tag of a data frame.
const DATA: u8 = 0;
/// Tag of the trailers frame.
const TRAILERS: u8 = 1;
/// Largest data frame.
pub const MAX_DATA: usize = 16 << 20;

/// One decoded frame of a framed body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyFrame {
    /// Body bytes.
    Data(Bytes),
    /// The trailers, last.
    Trailers(Vec<(String, HeaderValueBytes)>),
}

/// The prefix of a data frame of `len` bytes (the bytes follow it as they are).
pub fn data_prefix(len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.put_u8(DATA);
    b.put_u32(len as u32);
    b.freeze()
}

/// The trailers frame.
pub fn encode_trailers(trailers: &[(String, HeaderValueBytes)]) -> Result<Bytes, FrameError> {
    let json = serde_json::to_vec(trailers)?;
    if json.len() > MAX_FRAME_LEN {
        return Err(FrameError::Oversized { len: json.len() });
    }
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(TRAILERS);
    b.put_u32(json.len() as u32);
    b.put_slice(&json);
    Ok(b.freeze())
}

/// Decodes a framed body from the bytes of a stream, as they come. A data frame's bytes are
/// handed on as they arrive (never held whole: a peer's 16 MiB frame costs what one read
/// brought); only the trailers frame, at most 64 KiB, is gathered before it is decoded.
#[derive(Debug, Default)]
pub struct BodyDecoder {
    buf: BytesMut,
    trailers_seen: bool,
    /// Bytes of the current data frame still to come.
    remaining: usize,
}

impl BodyDecoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next frame, or the next piece of the current data frame, if any has arrived.
    pub fn next_frame(&mut self) -> Result<Option<BodyFrame>, FrameError> {
        if self.remaining > 0 {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let n = self.remaining.min(self.buf.len());
            self.remaining -= n;
            return Ok(Some(BodyFrame::Data(self.buf.split_to(n).freeze())));
        }
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        let limit = match tag {
            DATA => MAX_DATA,
            TRAILERS => MAX_FRAME_LEN,
            _ => return Err(FrameError::Invalid("unknown body frame tag")),
        };
        if len > limit {
            return Err(FrameError::Oversized { len });
        }
        if self.trailers_seen {
            return Err(FrameError::Invalid("a body frame after the trailers"));
        }
        if tag == DATA {
            self.buf.advance(5);
            if len == 0 {
                return Ok(Some(BodyFrame::Data(Bytes::new())));
            }
            self.remaining = len;
            return self.next_frame();
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        self.trailers_seen = true;
        Ok(Some(BodyFrame::Trailers(serde_json::from_slice(&payload)?)))
    }

    /// At FIN: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        let have = self.buf.len();
        if self.remaining > 0 {
            return Err(FrameError::Truncated {
                have,
                need: self.remaining,
            });
        }
        if have == 0 {
            return Ok(());
        }
        let need = match have {
            0..5 => 5,
            _ => {
                5 + u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize
            }
        };
        Err(FrameError::Truncated { have, need })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(frames: &[BodyFrame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            match f {
                BodyFrame::Data(d) => {
                    out.extend_from_slice(&data_prefix(d.len()));
                    out.extend_from_slice(d);
                }
                BodyFrame::Trailers(t) => out.extend_from_slice(&encode_trailers(t).unwrap()),
            }
        }
        out
    }

    #[test]
    fn frames_survive_any_split_into_reads() {
        let frames = vec![
            BodyFrame::Data(Bytes::from_static(b"\0\0\0\0\x05hello")),
            BodyFrame::Data(Bytes::new()),
            BodyFrame::Data(Bytes::from(vec![7u8; 70_000])),
            BodyFrame::Trailers(vec![
                ("grpc-status".into(), HeaderValueBytes::from(&b"0"[..])),
                (
                    "grpc-message".into(),
                    HeaderValueBytes::from(&b"ok \xff"[..]),
                ),
            ]),
        ];
        let wire = encode(&frames);
        // What a body carries: its bytes, then its trailers (data frames may come in pieces).
        let carried = |frames: &[BodyFrame]| {
            let mut data = Vec::new();
            let mut trailers = None;
            for f in frames {
                match f {
                    BodyFrame::Data(d) => data.extend_from_slice(d),
                    BodyFrame::Trailers(t) => trailers = Some(t.clone()),
                }
            }
            (data, trailers)
        };
        for step in [1, 2, 5, 6, 4096, wire.len()] {
            let mut d = BodyDecoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
                // The 70,000-byte data frame is handed on as it comes, never held whole.
                assert!(d.buf.len() < 1024, "{} bytes held", d.buf.len());
            }
            d.finish().unwrap();
            assert_eq!(carried(&got), carried(&frames), "reads of {step} bytes");
        }
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let mut d = BodyDecoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert!(d.next_frame().is_err(), "unknown tag");
        let mut d = BodyDecoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::Oversized { .. })));
        let mut d = BodyDecoder::default();
        d.push(&[1, 0, 1, 0, 1]);
        assert!(
            matches!(d.next_frame(), Err(FrameError::Oversized { .. })),
            "trailers over 64 KiB"
        );
        let mut d = BodyDecoder::default();
        d.push(&encode(&[
            BodyFrame::Trailers(vec![]),
            BodyFrame::Data(Bytes::from_static(b"x")),
        ]));
        assert!(d.next_frame().unwrap().is_some());
        assert!(d.next_frame().is_err(), "data after the trailers");
        let mut d = BodyDecoder::default();
        d.push(&[0, 0, 0, 0, 3, b'a']);
        assert_eq!(
            d.next_frame().unwrap(),
            Some(BodyFrame::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(d.next_frame().unwrap(), None);
        assert!(d.finish().is_err(), "cut off at FIN");
        let mut d = BodyDecoder::default();
        d.push(&[1, 0, 0, 0, 2, b'{', b'}']);
        assert!(d.next_frame().is_err(), "trailers that are not a list");
    }
}
