//! How the heads of request streams are encoded: JSON (every v1 peer) or a compact binary
//! form that both ends of a connection agreed on at registration.
//!
//! A request costs four head encodings or decodings (the request head at the edge and the
//! connector, the response head at both), and JSON spent most of that escaping, parsing and
//! allocating strings. The binary form is a tag byte, then each field as a big-endian length
//! and its bytes, in a fixed order; headers are a count and (name, value) pairs, values kept
//! byte for byte. Control messages stay JSON: they are rare and benefit from being readable.
//!
//! Negotiation: a connector lists the encodings it reads in `Register.heads`; the edge picks
//! one it also speaks and names it in `Registered.heads`. A peer that predates this sends no
//! list or no choice, and the connection keeps JSON, so old and new peers work together.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{decode, encode, FrameError, MAX_FRAME_LEN};
use super::message::{Headers, RequestHead, ResponseHead, ResponseSource};

/// The name of the binary encoding in `Register.heads` and `Registered.heads`.
pub const BINARY: &str = "binary-1";

/// First payload byte of a binary request head (JSON never starts with it).
const REQUEST_TAG: u8 = 0xb1;
/// First payload byte of a binary response head.
const RESPONSE_TAG: u8 = 0xb2;

/// The encoding of the heads on one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeadCodec {
    /// JSON, as every v1 peer speaks it.
    #[default]
    Json,
    /// [`BINARY`].
    Binary,
}

impl HeadCodec {
    /// The encodings a connector offers in `Register.heads`.
    pub fn offered() -> Vec<String> {
        vec![BINARY.to_string()]
    }

    /// The edge's choice among what a connector offered (`None`: JSON, said by omission).
    pub fn choose(offered: &[String]) -> Option<&'static str> {
        offered.iter().any(|h| h == BINARY).then_some(BINARY)
    }

    /// The codec the edge's answer names (absent or unknown: JSON).
    pub fn chosen(answer: Option<&str>) -> HeadCodec {
        match answer {
            Some(BINARY) => HeadCodec::Binary,
            _ => HeadCodec::Json,
        }
    }

    /// One request head as a frame, length prefix included.
    pub fn encode_request(self, head: &RequestHead) -> Result<Bytes, FrameError> {
        match self {
            HeadCodec::Json => encode(head),
            HeadCodec::Binary => {
                let mut w = Writer::new(REQUEST_TAG);
                let flags = u8::from(head.empty_body)
                    | u8::from(head.client_addr.is_some()) << 1
                    | u8::from(head.upgrade.is_some()) << 2
                    | u8::from(head.trailers) << 3;
                w.out.put_u8(flags);
                for s in [
                    &head.request_id,
                    &head.method,
                    &head.scheme,
                    &head.authority,
                    &head.path,
                ] {
                    w.bytes(s.as_bytes())?;
                }
                for s in [&head.client_addr, &head.upgrade].into_iter().flatten() {
                    w.bytes(s.as_bytes())?;
                }
                w.headers(&head.headers)?;
                w.finish()
            }
        }
    }

    /// One request head from a frame's payload. Header values of a binary head are slices of
    /// `payload`, not copies: the frame (at most 64 KiB) lives as long as they do.
    pub fn decode_request(self, payload: &Bytes) -> Result<RequestHead, FrameError> {
        match self {
            HeadCodec::Json => decode(payload),
            HeadCodec::Binary => {
                let mut r = Reader::new(payload, REQUEST_TAG)?;
                let flags = r.u8()?;
                let mut head = RequestHead {
                    request_id: r.string()?,
                    method: r.string()?,
                    scheme: r.string()?,
                    authority: r.string()?,
                    path: r.string()?,
                    headers: Headers::default(),
                    client_addr: None,
                    upgrade: None,
                    empty_body: flags & 1 != 0,
                    trailers: flags & 8 != 0,
                };
                if flags & 2 != 0 {
                    head.client_addr = Some(r.string()?);
                }
                if flags & 4 != 0 {
                    head.upgrade = Some(r.string()?);
                }
                head.headers = r.headers()?;
                r.end()?;
                Ok(head)
            }
        }
    }

    /// One response head as a frame, length prefix included.
    pub fn encode_response(self, head: &ResponseHead) -> Result<Bytes, FrameError> {
        match self {
            HeadCodec::Json => encode(head),
            HeadCodec::Binary => {
                let mut w = Writer::new(RESPONSE_TAG);
                w.out.put_u16(head.status);
                w.out.put_u8(match head.source {
                    ResponseSource::Origin => 0,
                    ResponseSource::Plugin => 1,
                    ResponseSource::Connector => 2,
                    ResponseSource::Other => 255,
                });
                w.headers(&head.headers)?;
                w.finish()
            }
        }
    }

    /// One response head from a frame's payload, as [`HeadCodec::decode_request`].
    pub fn decode_response(self, payload: &Bytes) -> Result<ResponseHead, FrameError> {
        match self {
            HeadCodec::Json => decode(payload),
            HeadCodec::Binary => {
                let mut r = Reader::new(payload, RESPONSE_TAG)?;
                let status = r.u16()?;
                let source = match r.u8()? {
                    0 => ResponseSource::Origin,
                    1 => ResponseSource::Plugin,
                    2 => ResponseSource::Connector,
                    _ => ResponseSource::Other,
                };
                let headers = r.headers()?;
                r.end()?;
                Ok(ResponseHead {
                    status,
                    headers,
                    source,
                })
            }
        }
    }
}

/// Builds a binary head: the 4-byte length prefix is filled in by [`Writer::finish`].
struct Writer {
    out: BytesMut,
}

impl Writer {
    fn new(tag: u8) -> Writer {
        let mut out = BytesMut::with_capacity(512);
        out.put_u32(0);
        out.put_u8(tag);
        Writer { out }
    }

    /// A field: `u16` length, then the bytes (a frame holds at most 64 KiB anyway).
    fn bytes(&mut self, b: &[u8]) -> Result<(), FrameError> {
        let len = u16::try_from(b.len()).map_err(|_| FrameError::Oversized { len: b.len() })?;
        self.out.put_u16(len);
        self.out.put_slice(b);
        Ok(())
    }

    fn headers(&mut self, headers: &Headers) -> Result<(), FrameError> {
        let count = headers.map.len();
        let n = u16::try_from(count).map_err(|_| FrameError::Oversized { len: count })?;
        self.out.put_u16(n);
        for (name, value) in &headers.map {
            self.bytes(name.as_str().as_bytes())?;
            self.bytes(value.as_bytes())?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Bytes, FrameError> {
        let len = self.out.len() - 4;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::Oversized { len });
        }
        // Cannot truncate: checked against MAX_FRAME_LEN above.
        self.out[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(self.out.freeze())
    }
}

/// Reads a binary head; every read is bounds-checked, so hostile bytes give an error.
struct Reader<'a> {
    /// The whole payload, which header values are sliced from.
    payload: &'a Bytes,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(payload: &'a Bytes, tag: u8) -> Result<Reader<'a>, FrameError> {
        match payload.split_first() {
            Some((&t, rest)) if t == tag => Ok(Reader { payload, rest }),
            _ => Err(FrameError::Invalid(
                "not a binary head of the expected kind",
            )),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Invalid("binary head ends inside a field"));
        }
        let (field, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(field)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u16()?;
        self.take(n.into())
    }

    fn string(&mut self) -> Result<String, FrameError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_string)
            .map_err(|_| FrameError::Invalid("binary head field is not UTF-8"))
    }

    /// The headers; a field that is not valid HTTP is dropped and counted, not an error (as
    /// in the JSON form).
    fn headers(&mut self) -> Result<Headers, FrameError> {
        let n = self.u16()?;
        // Each header takes at least 4 bytes: a count beyond that is a lie, not an allocation.
        if usize::from(n) * 4 > self.rest.len() {
            return Err(FrameError::Invalid(
                "binary head announces more headers than it holds",
            ));
        }
        let mut headers = Headers {
            map: http::HeaderMap::with_capacity(n.into()),
            invalid: 0,
        };
        for _ in 0..n {
            let name = self.bytes()?;
            let value = self.payload.slice_ref(self.bytes()?);
            match http::HeaderValue::from_maybe_shared(value) {
                Ok(value) => headers.push_wire(name, value),
                Err(_) => headers.invalid += 1,
            }
        }
        Ok(headers)
    }

    fn end(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Invalid("bytes after the binary head"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HeaderValueBytes;

    /// A payload as decoding takes it.
    fn b(payload: &[u8]) -> Bytes {
        Bytes::copy_from_slice(payload)
    }

    fn request() -> RequestHead {
        RequestHead {
            request_id: "0123456789abcdef".into(),
            method: "POST".into(),
            scheme: "https".into(),
            authority: "app.example.com:8443".into(),
            path: "/a/b?c=d&é".into(),
            headers: vec![
                ("cookie".into(), "a=1".into()),
                ("cookie".into(), "b=2".into()),
                ("x-bin".into(), HeaderValueBytes(vec![0xff, 0x80, b'a'])),
                ("x-empty".into(), HeaderValueBytes(Vec::new())),
            ]
            .into(),
            client_addr: Some("192.0.2.1:5555".into()),
            upgrade: Some("websocket".into()),
            empty_body: true,
            trailers: true,
        }
    }

    fn response() -> ResponseHead {
        ResponseHead {
            status: 204,
            headers: vec![("x-bin".into(), HeaderValueBytes(vec![0xfe, b'x']))].into(),
            source: ResponseSource::Plugin,
        }
    }

    #[test]
    fn both_codecs_round_trip_every_field() {
        let minimal = RequestHead {
            client_addr: None,
            upgrade: None,
            empty_body: false,
            trailers: false,
            headers: Headers::default(),
            ..request()
        };
        for codec in [HeadCodec::Json, HeadCodec::Binary] {
            for head in [request(), minimal.clone()] {
                let frame = codec.encode_request(&head).unwrap();
                let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
                assert_eq!(len, frame.len() - 4, "{codec:?}");
                assert_eq!(
                    codec.decode_request(&b(&frame[4..])).unwrap(),
                    head,
                    "{codec:?}"
                );
            }
            let frame = codec.encode_response(&response()).unwrap();
            assert_eq!(codec.decode_response(&b(&frame[4..])).unwrap(), response());
        }
    }

    #[test]
    fn fields_that_are_not_http_are_dropped_and_counted_by_both_codecs() {
        // What a hostile or buggy peer could send: a value with a NUL and a control byte, a
        // name with a space, an empty name. Each is dropped, counted, and nothing else lost.
        let mut w = Writer::new(RESPONSE_TAG);
        w.out.put_u16(200);
        w.out.put_u8(0);
        let fields: [(&[u8], &[u8]); 5] = [
            (b"x-ok", b"1"),
            (b"x-nul", b"a\0b"),
            (b"x-ctl", b"\x01"),
            (b"bad name", b"v"),
            (b"", b"v"),
        ];
        w.out.put_u16(fields.len() as u16);
        for (name, value) in fields {
            w.bytes(name).unwrap();
            w.bytes(value).unwrap();
        }
        let frame = w.finish().unwrap();
        let head = HeadCodec::Binary.decode_response(&b(&frame[4..])).unwrap();
        assert_eq!(head.headers.invalid, 4);
        assert_eq!(head.headers.map.len(), 1);
        assert_eq!(head.headers.map["x-ok"], "1");
        let json = br#"{"status":200,"headers":[["x-ok","1"],["x-nul","a\u0000b"],["bad name","v"]],"source":"origin"}"#;
        let head = HeadCodec::Json.decode_response(&b(json)).unwrap();
        assert_eq!(head.headers.invalid, 2);
        assert_eq!(head.headers.map.len(), 1);
    }

    #[test]
    fn the_binary_form_is_smaller_than_json() {
        let json = HeadCodec::Json.encode_request(&request()).unwrap();
        let binary = HeadCodec::Binary.encode_request(&request()).unwrap();
        assert!(
            binary.len() * 3 < json.len() * 2,
            "{} vs {}",
            binary.len(),
            json.len()
        );
    }

    #[test]
    fn a_codec_refuses_the_other_kind_of_head() {
        let req = HeadCodec::Binary.encode_request(&request()).unwrap();
        let resp = HeadCodec::Binary.encode_response(&response()).unwrap();
        assert!(HeadCodec::Binary.decode_response(&b(&req[4..])).is_err());
        assert!(HeadCodec::Binary.decode_request(&b(&resp[4..])).is_err());
        let json = HeadCodec::Json.encode_request(&request()).unwrap();
        assert!(HeadCodec::Binary.decode_request(&b(&json[4..])).is_err());
        assert!(HeadCodec::Json.decode_request(&b(&req[4..])).is_err());
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_an_error() {
        let frame = HeadCodec::Binary.encode_request(&request()).unwrap();
        let payload = &frame[4..];
        for cut in 0..payload.len() {
            assert!(
                HeadCodec::Binary
                    .decode_request(&b(&payload[..cut]))
                    .is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = payload.to_vec();
        longer.push(0);
        assert!(HeadCodec::Binary.decode_request(&b(&longer)).is_err());
    }

    #[test]
    fn hostile_counts_and_bytes_are_errors_not_panics() {
        // A header count of 65,535 with nothing behind it.
        let lie = [RESPONSE_TAG, 0, 200, 0, 0xff, 0xff];
        assert!(HeadCodec::Binary.decode_response(&b(&lie)).is_err());
        // A string field that is not UTF-8.
        let frame = HeadCodec::Binary.encode_request(&request()).unwrap();
        let mut bad = frame[4..].to_vec();
        let at = 2 + 2; // tag, flags, length of the request id: its first byte
        bad[at] = 0xff;
        assert!(HeadCodec::Binary.decode_request(&b(&bad)).is_err());
        // Arbitrary bytes, deterministic: never a panic.
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..2000 {
            let junk: Vec<u8> = (0..(x % 64) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = HeadCodec::Binary.decode_request(&b(&junk));
            let _ = HeadCodec::Binary.decode_response(&b(&junk));
        }
    }

    #[test]
    fn a_head_too_large_for_a_frame_is_not_encoded() {
        let mut head = request();
        head.headers = (0..40)
            .map(|i| (format!("x-{i}"), HeaderValueBytes(vec![b'v'; 2000])))
            .collect::<Vec<_>>()
            .into();
        assert!(matches!(
            HeadCodec::Binary.encode_request(&head),
            Err(FrameError::Oversized { .. })
        ));
        head.headers = vec![("x-big".into(), HeaderValueBytes(vec![b'v'; 70_000]))].into();
        assert!(HeadCodec::Binary.encode_request(&head).is_err());
    }

    #[test]
    fn negotiation_falls_back_to_json() {
        assert_eq!(HeadCodec::choose(&HeadCodec::offered()), Some(BINARY));
        assert_eq!(HeadCodec::choose(&[]), None);
        assert_eq!(HeadCodec::choose(&["binary-9".into()]), None);
        assert_eq!(HeadCodec::chosen(Some(BINARY)), HeadCodec::Binary);
        assert_eq!(HeadCodec::chosen(None), HeadCodec::Json);
        assert_eq!(HeadCodec::chosen(Some("binary-9")), HeadCodec::Json);
    }
}
