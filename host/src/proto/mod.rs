//! The sluice wire protocol (v1), sans-IO: frames, control messages and stream heads.
//!
//! A frame is a big-endian `u32` length followed by that many bytes of JSON. The control
//! stream (the first bidirectional stream, opened by the connector) carries [`Control`]
//! messages; each request stream (opened by the edge) starts with one [`RequestHead`] frame and
//! is answered by one [`ResponseHead`] frame, each followed by the raw body until FIN — or,
//! when the request head sets `trailers` (on connections that agreed to it at registration),
//! by a framed body that can end with trailers ([`body`]).
//!
//! JSON keeps the protocol inspectable and lets v1 grow: unknown fields are ignored and unknown
//! control message kinds decode to [`Control::Unknown`]. The version is checked once, at
//! registration. The heads of request streams may instead use a compact binary form when both
//! ends agree at registration ([`HeadCodec`]); control messages are always JSON.
//!
//! A stream may instead carry a TCP session or a UDP flow from a public port of the edge: it
//! starts with a [`SessionHead`] (its own tag byte) and is answered by a [`SessionReply`];
//! only connectors that set `Register.sessions` are sent one.

pub mod body;
mod frame;
mod head;
pub mod io;
mod message;
mod session;

pub use head::{HeadCodec, BINARY as BINARY_HEADS};
pub use session::{
    decode_flow_datagram, encode_datagram, encode_flow_datagram, DatagramDecoder, SessionHead,
    SessionProtocol, SessionReply, MAX_DATAGRAM,
};

pub use frame::{decode, decode_len, encode, FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use message::{
    Control, Digest, HeaderValueBytes, Headers, Register, Registered, RejectCode, Rejected,
    RequestHead, ResponseHead, ResponseSource,
};

/// ALPN protocol id spoken between connector and edge over QUIC.
pub const ALPN: &[u8] = b"sluice/1";

/// ALPN protocol id spoken between connector and edge over HTTP/2 on TLS over TCP.
pub const ALPN_TCP: &[u8] = b"sluice-h2/1";

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Application error codes for closing connections and resetting streams (QUIC application
/// codes, HTTP/2 `RST_STREAM` and `GOAWAY` codes).
pub mod code {

    /// Normal close (shutdown).
    pub const CLOSE_NORMAL: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected message).
    pub const CLOSE_PROTOCOL: u32 = 1;
    /// Registration was refused.
    pub const CLOSE_REJECTED: u32 = 2;
    /// The tunnel was removed from the edge's configuration.
    pub const CLOSE_TUNNEL_REMOVED: u32 = 3;

    /// The request was cancelled (the client went away).
    pub const STREAM_CANCELLED: u32 = 0x10;
    /// The origin failed mid-body.
    pub const STREAM_ORIGIN_FAILED: u32 = 0x11;
    /// A malformed frame on a request stream.
    pub const STREAM_PROTOCOL: u32 = 0x12;
    /// A session (TCP or UDP) was idle past its timeout, or its origin failed.
    pub const STREAM_SESSION_ENDED: u32 = 0x13;
}
