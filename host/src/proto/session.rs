//! Session streams: a TCP connection or a UDP flow that a client opened on one of a tunnel's
//! public ports, carried on one stream of a connector connection.
//!
//! The edge opens the stream and sends one [`SessionHead`] frame; the connector connects to
//! the service's origin and answers one [`SessionReply`] frame. After it, a TCP session carries
//! the raw bytes both ways (FIN is the client's or the origin's half-close), and a UDP flow
//! carries each datagram as a big-endian `u16` length and its bytes ([`encode_datagram`],
//! [`DatagramDecoder`]).
//!
//! Over QUIC, a UDP flow's datagrams also travel as QUIC datagrams, unreliable and unordered
//! as UDP's are: the edge names a flow id in the head (`flow`), the connector accepts in its
//! reply (`datagrams`), and from then on each QUIC datagram is the flow id (big-endian `u32`)
//! and one UDP payload ([`encode_flow_datagram`]). A UDP datagram too large for a QUIC
//! datagram on the path goes on the flow's stream instead, framed as above; the receiver takes
//! both. The stream lives as long as the flow.
//!
//! A session head is told apart from a request head by its first payload byte,
//! [`SESSION_TAG`], which neither JSON nor the binary request head starts with; the JSON that
//! follows keeps it readable and lets it grow. Only connectors that set `Register.sessions`
//! are sent session streams, so an older connector never sees one.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::frame::{FrameError, MAX_FRAME_LEN};

/// First payload byte of a session head.
pub const SESSION_TAG: u8 = 0xb3;

/// Largest UDP datagram carried (the largest UDP payload over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// The transport protocol of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionProtocol {
    /// A TCP connection: a byte stream both ways.
    Tcp,
    /// A UDP flow (one client address and port): datagrams both ways.
    Udp,
}

impl SessionProtocol {
    /// `tcp` or `udp`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionProtocol::Tcp => "tcp",
            SessionProtocol::Udp => "udp",
        }
    }
}

/// First frame of a session stream (edge → connector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHead {
    /// The edge's id for the session, in both roles' logs.
    pub session_id: String,
    /// The connector's service (`[[service]] name`) the port is bound to.
    pub service: String,
    /// TCP or UDP.
    pub protocol: SessionProtocol,
    /// The client's address and port, as the edge saw them.
    pub client_addr: std::net::SocketAddr,
    /// The edge's address the client reached (the destination in a PROXY protocol header).
    pub listen_addr: std::net::SocketAddr,
    /// UDP over QUIC: the flow's id in QUIC datagrams, if the edge offers to use them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<u32>,
}

/// The connector's answer on a session stream: the origin is connected, or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReply {
    /// Why the session could not start (unknown service, origin refused, limit reached);
    /// absent: it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The connector accepts the flow's datagrams as QUIC datagrams (the head named a flow).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub datagrams: bool,
    /// With an error: another connector of the tunnel may accept the session (this one has
    /// no such service, or is at its limit), so the edge tries one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub elsewhere: bool,
}

impl SessionHead {
    /// The head as a frame, length prefix included.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let json = serde_json::to_vec(self)?;
        let len = json.len() + 1;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::Oversized { len });
        }
        let mut out = BytesMut::with_capacity(4 + len);
        // Cannot truncate: checked against MAX_FRAME_LEN above.
        out.put_u32(len as u32);
        out.put_u8(SESSION_TAG);
        out.put_slice(&json);
        Ok(out.freeze())
    }

    /// Whether a stream's first payload is a session head (and not a request head).
    pub fn is_session(payload: &[u8]) -> bool {
        payload.first() == Some(&SESSION_TAG)
    }

    /// The head from a frame's payload (its first byte [`SESSION_TAG`]).
    pub fn decode(payload: &[u8]) -> Result<SessionHead, FrameError> {
        match payload.split_first() {
            Some((&SESSION_TAG, json)) => Ok(serde_json::from_slice(json)?),
            _ => Err(FrameError::Invalid("not a session head")),
        }
    }
}

/// One datagram as it travels on a UDP flow's stream.
pub fn encode_datagram(datagram: &[u8]) -> Result<Bytes, FrameError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(FrameError::Oversized {
            len: datagram.len(),
        });
    }
    let mut out = BytesMut::with_capacity(2 + datagram.len());
    // Cannot truncate: MAX_DATAGRAM < 2^16.
    out.put_u16(datagram.len() as u16);
    out.put_slice(datagram);
    Ok(out.freeze())
}

/// One UDP payload of flow `flow` as a QUIC datagram.
pub fn encode_flow_datagram(flow: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + payload.len());
    out.put_u32(flow);
    out.put_slice(payload);
    out.freeze()
}

/// The flow and payload of a QUIC datagram; `None` when it is too short to name a flow.
pub fn decode_flow_datagram(mut datagram: Bytes) -> Option<(u32, Bytes)> {
    if datagram.len() < 4 {
        return None;
    }
    let flow = datagram.get_u32();
    Some((flow, datagram))
}

/// Splits a UDP flow's stream back into datagrams, whatever pieces it arrives in.
#[derive(Debug, Default)]
pub struct DatagramDecoder {
    buf: BytesMut,
}

impl DatagramDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete datagram, `None` if more bytes are needed.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > MAX_DATAGRAM {
            return Err(FrameError::Oversized { len });
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        self.buf.advance(2);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes of an incomplete datagram still buffered (at the end of the stream: truncated).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode_len, HeadCodec, RequestHead};

    fn head() -> SessionHead {
        SessionHead {
            session_id: "s-1".into(),
            service: "ssh".into(),
            protocol: SessionProtocol::Tcp,
            client_addr: "203.0.113.7:50000".parse().unwrap(),
            listen_addr: "[2001:db8::1]:2222".parse().unwrap(),
            flow: Some(7),
        }
    }

    #[test]
    fn a_session_head_round_trips_and_is_told_apart_from_request_heads() {
        let frame = head().encode().unwrap();
        let len = decode_len(frame[..4].try_into().unwrap()).unwrap();
        let payload = &frame[4..];
        assert_eq!(len, payload.len());
        assert!(SessionHead::is_session(payload));
        assert_eq!(SessionHead::decode(payload).unwrap(), head());

        let request = RequestHead {
            request_id: "r".into(),
            method: "GET".into(),
            scheme: "https".into(),
            authority: "a.test".into(),
            path: "/".into(),
            headers: Default::default(),
            client_addr: None,
            upgrade: None,
            empty_body: true,
            trailers: false,
        };
        for codec in [HeadCodec::Json, HeadCodec::Binary] {
            let frame = codec.encode_request(&request).unwrap();
            assert!(!SessionHead::is_session(&frame[4..]), "{codec:?}");
            assert!(SessionHead::decode(&frame[4..]).is_err());
        }
    }

    #[test]
    fn a_reply_without_error_is_a_success_and_unknown_fields_are_ignored() {
        let ok: SessionReply = serde_json::from_str(r#"{"later":1}"#).unwrap();
        assert_eq!(ok.error, None);
        assert_eq!(serde_json::to_string(&ok).unwrap(), "{}");
    }

    #[test]
    fn datagrams_survive_any_split_and_oversized_ones_are_refused() {
        let sent: Vec<Vec<u8>> = vec![b"ping".to_vec(), vec![], vec![7; 1400], vec![1; 65_507]];
        let mut wire = Vec::new();
        for d in &sent {
            wire.extend_from_slice(&encode_datagram(d).unwrap());
        }
        for piece in [1, 3, 1000, wire.len()] {
            let mut dec = DatagramDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                dec.push(chunk);
                while let Some(d) = dec.next_datagram().unwrap() {
                    got.push(d.to_vec());
                }
            }
            assert_eq!(got, sent, "split into pieces of {piece}");
            assert_eq!(dec.pending(), 0);
        }
        assert!(encode_datagram(&vec![0; 65_508]).is_err());
        let mut dec = DatagramDecoder::new();
        dec.push(&[0xff, 0xff]);
        assert!(dec.next_datagram().is_err());
    }

    #[test]
    fn flow_datagrams_carry_their_flow_id() {
        let d = encode_flow_datagram(0x0102_0304, b"payload");
        assert_eq!(&d[..4], &[1, 2, 3, 4]);
        assert_eq!(
            decode_flow_datagram(d),
            Some((0x0102_0304, Bytes::from_static(b"payload")))
        );
        assert_eq!(
            decode_flow_datagram(encode_flow_datagram(9, b"")),
            Some((9, Bytes::new()))
        );
        assert_eq!(decode_flow_datagram(Bytes::from_static(b"abc")), None);
    }
}
